"""The services, one package each: ``builtin`` (``engine.*`` jobs), ``kms``,
``csms`` and ``kps``. The engine finds them through ``[engine] services``
(``engine.services``); a service reaches another only through its ``interface``
module (checked by the import contracts in ``pyproject.toml``)."""
