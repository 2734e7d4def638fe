"""The safety net's action: restore the last good version, or judge that the data changed.

`rollback` takes the run as it stands and an alarm (safety.py decides when one
is raised) and returns the run as it stands afterwards, a new `Progress`:
  - a non-finite alarm, or a spike that the version to restore predicts clearly
    better than the current parameters: that version's state, with a lower
    learning rate, its totals and position when the stream goes back to it
    (`safety.restream`), and the versions after it discarded or set aside;
  - a spike that the version predicts no better: the data got harder, not the
    model worse. Nothing is restored; the watch starts over at the new level.
Both outcomes are recorded in registry.json and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from streamlearn.learn.prequential import Totals, score_through
from streamlearn.run.retune import retuned, same_source
from streamlearn.run.safety import (Alarm, Guard, lowered_lr_scale, rollback_candidates,
                                    spike_confirmed)
from streamlearn.run.session import Progress, Session
from streamlearn.store.checkpoint import Restored, VersionError, abstract_like
from streamlearn.store.rundir import move_aside

log = logging.getLogger("streamlearn.run")


class RollbackError(RuntimeError):
  """Nothing safe to go on with: not even the original version restores. One line."""


class Outcome(NamedTuple):
  progress: Progress     # the run after the alarm
  restored: int | None   # the version restored; None: the spike was the data's
  restream: bool         # the stream goes back to the restored version's position


def rollback(session: Session, progress: Progress, alarm: Alarm, writer) -> Outcome:
  """The run after `alarm`; raises RollbackError when no version restores."""
  cfg = session.config.safety
  session.finish_saving()  # every complete version in the registry before any is marked
  steps = session.checkpointer.all_steps()
  candidates = rollback_candidates(steps, alarm.before, progress.discarded)
  try:
    got = session.checkpointer.restore_newest(abstract_like(progress.state), candidates)
  except VersionError as err:
    raise RollbackError(f"rollback at chunk {alarm.chunk:,} ({alarm.detail}) impossible: "
                        f"{err}") from None
  if alarm.reason == "spike" and not _confirmed(session, progress, alarm, got, writer):
    return Outcome(dataclasses.replace(progress, guard=Guard.from_json(cfg, None)), None, False)

  # --- the event
  lr_scale = lowered_lr_scale(float(np.max(progress.state.lr_scale)), cfg)
  discarded = [s for s in steps if s > got.step]
  # Only the source the version was read from can be streamed again (never a pipe).
  restream = cfg.restream and same_source(got.record.get("source"), session.source)
  event = {"kind": "rollback", "time": time.time(), "reason": alarm.reason,
           "detail": alarm.detail, "chunk": alarm.chunk, "to": got.step,
           "discarded": discarded, "unreadable": [s for s, _ in got.unreadable],
           "lr_scale": lr_scale, "restream": restream}
  log.warning(f"rollback at chunk {alarm.chunk:,}: {alarm.detail}; restored version "
              f"{got.step}, learning rate x{lr_scale:g}")
  writer.add_scalar("safety/rollback_to", got.step, alarm.chunk)
  writer.add_text("safety/events", json.dumps(event), alarm.chunk)
  session.registry.add_event(event)

  # --- the restored state: a lower learning rate, and the config's changes since the version
  state = got.state.replace(lr_scale=jnp.full(np.shape(got.state.lr_scale), lr_scale,
                                              jnp.float32))
  if session.swarm is not None:  # the whole swarm goes back; member ids are never reused
    session.swarm.rolled_back_to(got.record["swarm"], restream)
  state, anchor = retuned(session.config, state, got.record, session.first_anchor,
                          session.swarm.population if session.swarm is not None else None)
  restored = dataclasses.replace(
      progress, state=session.place(state), parent=got.step, anchor=anchor,
      guard=Guard.from_json(cfg, None), events=progress.events + [event])

  # --- the versions after it: set aside with the stream going back, else never restored again
  if restream:
    where = move_aside(session.run_dir, discarded, f"rolled-back-from-{alarm.chunk}")
    session.checkpointer.reload()
    session.registry.mark_aside(discarded, where)
    restored = dataclasses.replace(restored, totals=Totals(**got.record["totals"]),
                                   position=got.record["position"])
  else:
    restored = dataclasses.replace(restored, discarded=progress.discarded | set(discarded))
    session.registry.mark_rolled_back(discarded)
  session.registry.write()
  return Outcome(restored, got.step, restream)


def _confirmed(session: Session, progress: Progress, alarm: Alarm, got: Restored,
               writer) -> bool:
  """Whether version `got` predicts the alarm's chunks clearly better than the run does now."""
  now_params = session.leader_params(progress.state)
  then_params = session.leader_params(got.state, got.record.get("swarm"))
  # Both frozen, both from an empty carry: neither gains from context the other lacks.
  carry = session.predictor.init_carry(1, session.tokenizer.bos_id)
  now = score_through(session.score_fn, now_params, carry, alarm.window).bits_per_byte
  then = score_through(session.score_fn, then_params, carry, alarm.window).bits_per_byte
  if spike_confirmed(now, then, session.config.safety):
    return True
  # Not printed (the status line counts them): it changed nothing.
  event = {"kind": "spike_ignored", "time": time.time(), "detail": alarm.detail,
           "chunk": alarm.chunk, "checked": got.step, "checked_bpb": then, "current_bpb": now}
  writer.add_text("safety/events", json.dumps(event), alarm.chunk)
  session.registry.add_event(event)  # not in progress.events: versions carry only rollbacks
  session.registry.write()
  return False
