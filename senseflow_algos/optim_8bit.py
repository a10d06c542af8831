"""8-bit AdamW in the phased one-optimizer form: bitsandbytes' ``AdamW8bit`` with :class:`PhasedOptimizerMixin`.

Adam's two moments are kept as uint8 with a per-block (256 values) absmax scale and a dynamic quantisation map
(bitsandbytes' block-wise 8-bit optimizer), 2 bytes per parameter instead of 8. Tensors with fewer than
``min_8bit_size`` elements keep fp32 moments. bitsandbytes runs this optimizer on CUDA and on the CPU.

Select it with ``optimizer.kind: adamw_8bit`` (needs ``pip install -e ".[bnb]"``, included in ``dev``). It is for
unsharded runs (one GPU, DDP): with FSDP the optimizer state is already sharded, and bitsandbytes' block-wise state
is not a sharded tensor that torch's distributed checkpoint can save; :func:`senseflow_algos.builders.build_trainer`
refuses the combination.

Trained parameters must be fp32 here (``model.dtype: fp32``, the default): bitsandbytes writes the update in the
parameter's own dtype, and a bf16 weight rounds away steps below half its spacing (see
:data:`~senseflow_algos.optim.LOW_PRECISION_REASON`). Stochastic rounding is implemented for ``optimizer.kind:
adamw`` only, so bf16/fp16 parameters and ``stochastic_rounding=True`` are refused with that reason.
"""

from __future__ import annotations

from typing import Iterable, Optional

from senseflow_algos.optim import LOW_PRECISION_REASON, PhaseController, PhasedOptimizerMixin
from senseflow_algos.stochastic_rounding import is_low_precision

try:
    from bitsandbytes.optim import AdamW8bit as _AdamW8bit
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('optimizer.kind=adamw_8bit needs bitsandbytes: pip install -e ".[bnb]"') from e

__all__ = ['PhasedAdamW8bit']


class PhasedAdamW8bit(PhasedOptimizerMixin, _AdamW8bit):
    """:class:`~senseflow_algos.optim.PhasedAdamW` with 8-bit Adam moments.

    Args:
        params (Iterable[dict]): Param groups with a ``role`` key (as for ``PhasedAdamW``).
        controller (PhaseController): The phase controller (the DMD model).
        max_grad_norm (float, optional): Per-role gradient clipping. Default: ``None``.
        on_nonfinite (str): ``stop`` or ``skip`` (as for ``PhasedAdamW``). Default: ``stop``.
        min_8bit_size (int): Tensors with fewer elements keep fp32 moments. Default: ``4096`` (bitsandbytes').
        stochastic_rounding (bool): Must stay ``False`` (not implemented for 8-bit moments; the parameters must
            be fp32). Default: ``False``.
        **adamw_kwargs: ``lr``, ``betas``, ``eps``, ``weight_decay``.
    """

    def __init__(self, params: Iterable[dict], controller: PhaseController, max_grad_norm: Optional[float] = None,
                 on_nonfinite: str = 'stop', min_8bit_size: int = 4096, stochastic_rounding: bool = False,
                 **adamw_kwargs):
        if stochastic_rounding:
            raise ValueError('optimizer.stochastic_rounding is implemented for optimizer.kind=adamw only: '
                             'bitsandbytes updates each parameter inside its own kernel. With adamw_8bit keep fp32 '
                             'master weights (model.dtype: fp32).')
        groups = list(params)
        self._check_groups(groups, on_nonfinite)
        super().__init__(groups, min_8bit_size=min_8bit_size, **adamw_kwargs)
        self._init_phases(controller, max_grad_norm, on_nonfinite)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; bf16/fp16 trainable parameters are refused (see the module docstring)."""
        super().add_param_group(param_group)
        low = sorted({str(p.dtype) for p in self.param_groups[-1]['params'] if p.requires_grad and is_low_precision(p)})
        if low:
            raise ValueError(f'optimizer.kind=adamw_8bit got trainable parameters in {", ".join(low)} (model.dtype): '
                             f'{LOW_PRECISION_REASON}; stochastic rounding is implemented for optimizer.kind=adamw '
                             'only, so use model.dtype: fp32 with adamw_8bit.')
