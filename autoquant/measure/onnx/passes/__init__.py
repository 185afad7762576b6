"""The rewrite passes of the QDQ export, one module each (the manager lists their order)."""
