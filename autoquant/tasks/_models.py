"""Model classes of the built-in tasks (the project's own code, matching checkpoint keys)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Additive attention bias on padded keys: exp(-1e4 + score) is exactly 0 in float32, and the
# value stays in float16's range (BERT's original choice; Hugging Face uses finfo.min).
MASK_BIAS = -1e4


class DigitsCNN(nn.Module):
    """Small CNN for 1×8×8 scikit-learn digits: two conv+BN+ReLU, max-pool, two linear layers.

    Example:
        >>> import torch
        >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        # Sequential order = execution order, so "BN follows its conv" is visible to folding.
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(1, 16, 3, padding=1, bias=False),
                bn1=nn.BatchNorm2d(16),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(16, 32, 3, padding=1, bias=False),
                bn2=nn.BatchNorm2d(32),
                relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(32 * 4 * 4, 64),
                relu3=nn.ReLU(),
                fc2=nn.Linear(64, num_classes),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class LeNet5(nn.Module):
    """LeNet-5 for 1×32×32 MNIST, ending in LogSoftmax (keys ``convnet.c1/c3/c5, fc.f6/f7``).

    Example:
        >>> import torch
        >>> LeNet5()(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.convnet = nn.Sequential(
            OrderedDict(
                c1=nn.Conv2d(1, 6, 5),
                relu1=nn.ReLU(),
                s2=nn.MaxPool2d(2, 2),
                c3=nn.Conv2d(6, 16, 5),
                relu3=nn.ReLU(),
                s4=nn.MaxPool2d(2, 2),
                c5=nn.Conv2d(16, 120, 5),
                relu5=nn.ReLU(),
            )
        )
        self.fc = nn.Sequential(
            OrderedDict(
                f6=nn.Linear(120, 84),
                relu6=nn.ReLU(),
                f7=nn.Linear(84, 10),
                sig7=nn.LogSoftmax(dim=-1),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.convnet(x).flatten(1))


class PadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2015): stride-2 subsample, zero-pad the new channels.

    Parameter-free, so a stride-2 block adds no weights for its shortcut.

    Example:
        >>> import torch
        >>> PadShortcut(16)(torch.ones(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, out_planes: int | None = None) -> None:
        super().__init__()
        extra = (out_planes if out_planes is not None else 2 * in_planes) - in_planes
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN layers with an identity or option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            PadShortcut(in_planes, planes) if stride != 1 or in_planes != planes else nn.Identity()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with option-A shortcuts (keys ``conv1, bn1, layer1..3, linear``).

    Args:
        depth: 20, 32, 44, 56, 110, ... (``(depth - 2) % 6 == 0``).
        num_classes: output classes.

    Example:
        >>> import torch
        >>> net = CifarResNet(20)
        >>> sum(p.numel() for p in net.parameters())
        269722
    """

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"depth={depth!r} is not allowed; allowed values: 6n+2 (20, 32, 56, ...)"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.pool(out).flatten(1))


class BertClassifier(nn.Module):
    """A Hugging Face ``BertModel`` encoder, mean pooling over the attention mask, a linear head.

    ``forward(input_ids, attention_mask)`` takes int64 ``[B, L]`` tensors and returns logits
    ``[B, num_labels]``. It runs the encoder's own submodules (``bert.embeddings``, then each
    of ``bert.encoder.layer``) with an additive mask built here, rather than
    ``BertModel.forward``, whose mask utilities branch on tensor values and cannot be traced;
    the hidden states equal ``BertModel(...).last_hidden_state`` (tested). Position and
    token-type ids are derived from ``input_ids``, so any length up to the model's maximum
    works. The Linear and Embedding layers are ordinary submodules (``bert.encoder.layer.0.
    attention.self.query``, ..., ``head``), so a plan can name them.

    Args:
        bert: a ``transformers.BertModel`` (pooling layer unused; build it without one).
        num_labels: classes of the head.

    Example:
        >>> from transformers import BertConfig, BertModel  # doctest: +SKIP
        >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                  intermediate_size=64)  # doctest: +SKIP
        >>> model = BertClassifier(BertModel(cfg, add_pooling_layer=False))  # doctest: +SKIP
        >>> ids = torch.tensor([[101, 2307, 102, 0]])  # doctest: +SKIP
        >>> model(ids, (ids > 0).long()).shape  # doctest: +SKIP
        torch.Size([1, 2])
    """

    def __init__(self, bert: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, num_labels)

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The mean of the last hidden states over unmasked tokens, ``[B, hidden]``."""
        # cumsum, not arange(L): traceable without reading the length as a Python int.
        position_ids = torch.cumsum(torch.ones_like(input_ids), 1) - 1
        h = self.bert.embeddings(
            input_ids=input_ids,
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=position_ids,
        )
        keep = attention_mask.to(h.dtype)
        bias = (1.0 - keep[:, None, None, :]) * MASK_BIAS
        for layer in self.bert.encoder.layer:
            h = layer(h, bias)
            if isinstance(h, tuple):  # transformers 4.x layers return (hidden, ...)
                h = h[0]
        weights = keep.unsqueeze(-1)
        return (h * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.features(input_ids, attention_mask))
