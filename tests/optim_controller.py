"""The phase controller the optimizer tests hand to PhasedAdamW / PhasedAdamW8bit in place of a DMD model."""

from __future__ import annotations


class Controller:
    """Serves fixed training phases and records the optimizer's begin/end calls in ``log``."""

    def __init__(self, phases):
        self.phases, self.log = phases, []

    def training_phases(self):
        return self.phases

    def begin_phase(self, phase):
        self.log.append(('begin', phase.kind))

    def end_phase(self, phase):
        self.log.append(('end', phase.kind))

    def end_batch(self):
        self.log.append(('end_batch',))
