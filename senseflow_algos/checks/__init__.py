"""Run-config checks that need more than the schema (used by :mod:`senseflow_algos.preflight`).

Each module holds one check ``check_*(cfg, source) -> None`` that raises
:class:`~senseflow_algos.config.ConfigError`. They import nothing heavy (no torch, no Composer), so a run that
cannot work stops in about a second.
"""
