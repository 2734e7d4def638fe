"""What a run writes to TensorBoard for each chunk, under which tag."""

from __future__ import annotations

# The step's metrics beyond the prequential score (the delta learner's), by tag.
STEP_TAGS = {
    "forecast_bits": "delta/forecast_bits_per_token", "forecast_agreement": "delta/agreement",
    "delta_rms_bits": "delta/surprise_rms_bits", "forecast_entropy": "delta/forecast_entropy",
    "gate": "delta/gate", "loss_ce": "loss/cross_entropy",
    "arrival_grad_norm": "train/arrival_grad_norm", "loss_consistency": "loss/consistency",
    "loss_residual": "loss/residual", "loss_kl": "guard/kl_to_anchor",
    "teacher_distance": "guard/ema_student_distance",
    "replay_bits": "replay/sampled_bits_per_token", "replay_fill": "replay/fill",
    "replay_priority_mean": "replay/priority_mean", "replay_priority_max": "replay/priority_max"}


def write_chunk(writer, step: int, m: dict, running_bpb: float, bytes_per_s: float,
                tokens_per_byte: float, skipped: bool, score: float | None) -> None:
  """One chunk's scalars: its score, the running score, speed, the update, the safety net."""
  writer.add_scalar("prequential/bits_per_byte", float(m["bits_per_byte"]), step)
  writer.add_scalar("prequential/bits_per_byte_running", running_bpb, step)
  writer.add_scalar("prequential/bits_per_token", float(m["bits_per_token"]), step)
  writer.add_scalar("speed/bytes_per_s", bytes_per_s, step)
  writer.add_scalar("speed/tokens_per_s", bytes_per_s * tokens_per_byte, step)
  writer.add_scalar("train/grad_norm", float(m["grad_norm"]), step)
  writer.add_scalar("train/learning_rate", float(m["learning_rate"]), step)
  writer.add_scalar("safety/skipped", float(skipped), step)
  if score is not None:
    writer.add_scalar("safety/score", score, step)
  for key, tag in STEP_TAGS.items():
    if key in m:
      writer.add_scalar(tag, float(m[key]), step)


class NoWriter:
  """TensorBoard for processes other than 0: process 0 writes the run's events."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None
