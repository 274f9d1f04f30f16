"""Training progress: the ui stage bar (steps, ETA, loss, tokens/s) on a TTY, plain log lines otherwise."""

from __future__ import annotations

import math
import time


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def make_callback(bar: bool, log_lines: bool):
    """A TrainerCallback; ``bar`` for a live bar, ``log_lines`` for one line per logging step."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.tokens0 = 0
            self.step0 = 0
            self.loss = float("nan")
            self.progress = None
            self.task = None

        def _rates(self, state):
            dt = max(time.perf_counter() - self.t0, 1e-9)
            steps = state.global_step - self.step0
            tok_s = (state.num_input_tokens_seen - self.tokens0) / dt
            eta = dt / steps * (state.max_steps - state.global_step) if steps else float("nan")
            return tok_s, eta

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.tokens0, self.step0 = state.num_input_tokens_seen, state.global_step
            if bar and state.is_world_process_zero:
                from edgepeft.ui import stage  # the one progress rule every command uses

                self.progress = stage("train", total=state.max_steps, unit="steps")
                self.task = self.progress.__enter__()
                self.task.update(completed=state.global_step, note="loss -")

        def on_step_end(self, args, state, control, **kw):
            # transformers logs every logging_steps only; the last step's loss belongs in the
            # manifest's loss curve and the log whatever the interval.
            if state.global_step >= state.max_steps:
                control.should_log = True
            if self.progress is not None:
                tok_s, _ = self._rates(state)
                loss = "-" if math.isnan(self.loss) else f"{self.loss:.4f}"  # no loss logged yet
                self.task.update(completed=state.global_step, note=f"loss {loss}  {tok_s:,.0f} tok/s")

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            self.loss = float(logs["loss"])
            if log_lines and self.progress is None:
                tok_s, eta = self._rates(state)
                eta_s = "?" if math.isnan(eta) else _fmt_eta(eta)
                from edgepeft.ui import info

                info(f"step {state.global_step}/{state.max_steps} loss {self.loss:.4f} "
                     f"lr {logs.get('learning_rate', 0):.2e} tok/s {tok_s:,.0f} eta {eta_s}")

        def on_train_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.__exit__(None, None, None)
                self.progress = None

    return Progress()
