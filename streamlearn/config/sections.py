"""The config's sections: one frozen dataclass per TOML table, each field declared once with
its type, default and a comment; `Config` holds them all. Loading and checking them is
streamlearn/config/__init__.py's job.
"""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
  """A bad config: the message is one line and names the offending key."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  d_model: int = 128          # residual stream width
  n_layers: int = 1           # each layer = recurrent block + MLP block
  lru_width: int = 128        # width of the gated diagonal recurrence
  mlp_mult: int = 4           # MLP hidden width = mlp_mult * d_model
  conv_width: int = 4         # taps of the short causal depthwise conv
  scan_impl: str = "auto"     # linear_scan: auto | lax | associative | blocked | pallas
  line_position: bool = True  # the trunk reads how many tokens precede each one on its line


# Sizes from ~0.1M to ~30M parameters (byte vocabulary), for `[model] preset`.
PRESETS: dict[str, ModelConfig] = {
    "nano": ModelConfig(d_model=64, n_layers=2, lru_width=64, mlp_mult=3),        # ~0.13M
    "micro": ModelConfig(d_model=128, n_layers=3, lru_width=128, mlp_mult=3),     # ~0.72M
    "small": ModelConfig(d_model=256, n_layers=4, lru_width=256, mlp_mult=3),     # ~3.7M
    "medium": ModelConfig(d_model=384, n_layers=6, lru_width=384, mlp_mult=3),    # ~12M
    "large": ModelConfig(d_model=512, n_layers=8, lru_width=512, mlp_mult=3),     # ~29M
}


@dataclasses.dataclass(frozen=True)
class MatchConfig:
  enabled: bool = True        # the match model's prediction enters the logits (streamlearn/nn/match.py)
  orders: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 11, 16, 23, 32)  # contexts hashed: one candidate each
  max_len: int = 32           # longest match verified; the trust in a match is learned per length
  history_log2: int = 20      # tokens of stream history kept: 2^20
  table_log2: int = 18        # slots of each context's hash table: 2^18
  lr_mult: float = 20.0       # the trust table learns this much faster than the network


@dataclasses.dataclass(frozen=True)
class CountsConfig:
  """Hashed next-token counts per context order (streamlearn/nn/counts.py); read by the mixer."""
  enabled: bool = True        # needs mixer.enabled: the counts reach the prediction through it
  orders: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # context lengths counted (ascending), a table each
  dense_below: int = 3        # orders below this count every token (a vocabulary-wide row each)
  dense_log2: int = 14        # slots per dense table: 2^14 contexts
  table_log2: int = 18        # slots per other order's table: 2^18 contexts (16-bit entries
                              # for byte vocabularies: the memory of 2^17 32-bit ones)
  keep: int = 16              # ...each keeping its most frequent next tokens, this many
  recent: int = 8             # a slot's new top tokens come from those it kept, the token and
                              # this many latest earlier ones in the chunk with its context
  limit: int = 60             # a count past this halves the context's counts (recent weighs more)
  survive_from: int = 2       # > 0: a context whose top count is at least this keeps its slot
                              # when another hashes there (its counts halve); 0: newest wins
  word: bool = True           # also the word in progress and the one before (a table, as orders 3+)
  word3: bool = True          # also the word before those two: recurring phrases
  column: bool = True         # also the token above (previous line) and to the left: code layout


@dataclasses.dataclass(frozen=True)
class MixerConfig:
  """The final prediction as a learned mix in logit space (streamlearn/nn/mixer.py)."""
  enabled: bool = True        # mixes the network's, each count order's and the match model's
  lr_mult: float = 2.5        # its weights learn this much faster than the network (0: fixed)
  gate: bool = True           # a weight set per small context (count confidence, match length)
  count_weight: float = 0.3   # each count order's starting weight (the network's is 1)
  prior: float = 0.05         # pseudo-count of every token in a count prediction (learned on)
  gate_token: bool = True     # plus a weight set per previous token (added to the gate's)
  apm: bool = False           # an APM stage after the mix: corrections by stretch(p) per context
  online_lr: float = 0.0015   # > 0: the weights also move after every token, by this step size
  online_pairs: bool = True   # ...and rows by the two tokens before (hashed to 4096), too
  online_boost: float = 16.0  # ...times 1 + this / (1 + the steps its row took before): rare
                              # weight sets learn fast, frequent ones settle
  count_map: bool = True      # counts -> log-probability by a learned map per order and total
                              # count (terms of the token's count: log, thresholds), not a formula


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  kind: str = "bytes"         # bytes (256 + specials, no training) | bpe
  vocab_size: int = 1024      # bpe only: total vocabulary, specials included
  warmup_bytes: int = 1_000_000  # bpe only: stream prefix the vocabulary is trained on


@dataclasses.dataclass(frozen=True)
class DataConfig:
  chunk_tokens: int = 256     # tokens per learner step (one tick of the stream)
  max_file_bytes: int = 1_000_000  # directory sources skip larger files
  block_bytes: int = 65_536   # how much a source reads at a time


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 2.5e-3  # AdamW peak learning rate
  warmup_steps: int = 0        # linear warm-up from 0 over this many steps (0: none), then constant
  decay_steps: int = 0         # > 0: then decays as 1/sqrt(1 + step/decay_steps); 0: constant
  b1: float = 0.5              # short momentum: the network follows the stream faster
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.0    # decoupled; applied to matrices only
  grad_clip: float = 1.0       # global-norm clip


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_chunks: int = 1000    # save a version every this many chunks
  max_to_keep: int = 3        # newest versions kept
  keep_period: int = 10_000   # long-term: also keep one version per this many chunks (0: none)
  keep_best: int = 1          # also keep this many versions with the best score (0: none)
  max_failed_saves: int = 3   # after this many failed saves in a row (a full disk) the run stops
  idle_seconds: float = 30.0  # a followed stream (--follow) quiet this long saves what was learned (0: never)


@dataclasses.dataclass(frozen=True)
class LogConfig:
  tensorboard_every: int = 1  # write per-chunk scalars every this many chunks
  progress_seconds: float = 0.5  # how often the terminal progress line refreshes


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
  max_skips: int = 3          # consecutive non-finite (skipped) updates that trigger a rollback
  spike_fraction: float = 0.5  # roll back when the score exceeds its rolling median by this (0: off)
  signal_chunks: int = 16     # the score: prequential bits/byte over the last this many chunks
  median_chunks: int = 256    # the rolling median's window; checks start once it is full
  lr_factor: float = 0.5      # each rollback multiplies the learning rate by this
  min_lr_scale: float = 0.01  # ...down to this fraction of optim.learning_rate at the least
  restream: bool = False      # after a rollback, stream again from the restored version's position


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
  """Two-stream delta learning (streamlearn/learn/delta.py); lag = 0 is the plain learner."""
  lag: int = 0                # learn from the forecast made this many ticks ago (0: no forecast)
  arrival: bool = False       # also learn from each chunk as it arrives, on the pass that scored it
  forecast_tokens: int = 32   # K: the forecast is an open-loop rollout of the next chunk's first K
  temperature: float = 0.0    # the rollout's sampling temperature (0: greedy)
  forecast_channel: bool = True  # the trunk also reads the forecast tokens (second input stream)
  reality_drop: float = 0.15  # ...except on this fraction of tokens, so it never trusts them blindly
  consistency: float = 0.0    # β1: ||f_EMA(real) - f_student(with forecast)||^2 (0: no EMA teacher)
  ema_decay: float = 0.99     # the EMA teacher's decay per learner step
  residual: float = 0.0       # β2: ||δ - W h||^2, the surprise predicted from the hidden state
  kl: float = 0.0             # β3: KL(student || frozen anchor) on the real chunk (0: none kept)
  anchor: str = ""            # the KL guard's frozen model: "" (the run's start), RUN_DIR[@STEP]
  gate: bool = False          # scale the update down when the forecast was uncertain
  gate_temperature: float = 1.0  # nats of forecast entropy above its running mean that halve it
  gate_min: float = 0.25      # the gate never scales an update below this


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
  """Prioritized surprise replay: a fixed-size device buffer of past chunk openings."""
  capacity: int = 0           # entries kept (0: replay off); the least surprising is evicted
  tokens: int = 64            # tokens replayed per entry (each chunk's first this many)
  batch: int = 1              # entries replayed with every learner step
  alpha: float = 0.6          # sampling probability ∝ surprise^alpha
  beta: float = 0.4           # importance weights (N P)^-beta undo that bias this much
  weight: float = 1.0         # the replay loss's weight beside the fresh chunk's


@dataclasses.dataclass(frozen=True)
class CanaryConfig:
  """Fixed held-out text scored now and then without adaptation (forgetting shows here)."""
  paths: tuple[str, ...] = ()  # files (or file@START:END byte slices) scored as canaries
  every_chunks: int = 200     # score them every this many chunks
  max_bytes: int = 16_384     # per canary: its first this many bytes


@dataclasses.dataclass(frozen=True)
class SwarmConfig:
  size: int = 1               # learners in one vmapped step (1: the plain single learner)
  interval_bytes: int = 65_536  # population-based training: replace poor members this often
  score_chunks: int = 64      # a member's score: its bits/byte over its last this many chunks
  bottom_quantile: float = 0.25  # this fraction of members (at least one) may be replaced...
  top_quantile: float = 0.25  # ...each by a copy of one of this fraction (at least one)
  perturb: tuple[float, ...] = (0.8, 1.2)  # explore: each hyperparameter x one of these
  resample_prob: float = 0.25  # ...or, with this probability, drawn afresh from the initial range
  init_spread: float = 2.0    # initial range: centre value x [1/spread, spread], log-uniform
  fresh_prob: float = 0.1     # a replacement is a new member from the start (new seed), not a copy
  grace_bytes: int = 262_144  # members younger than this are never replaced
  mix: bool = True            # the run predicts with the members' mixture (false: the leader's)
  # (eta and share tuned on Austen and stdlib bytes 2.0-2.3 M, not reported: a flat optimum)
  mix_eta: float = 0.1        # a member's loss on a token (nats) x this comes off its log-weight
  mix_share: float = 0.01     # ...and this fraction of all weight is spread evenly, per token


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """`streamlearn serve`: the pool of best models behind Ollama- and OpenAI-style APIs."""
  host: str = "127.0.0.1"     # loopback; another address needs --allow-remote and a token
  port: int = 8765            # (11434 is Ollama's, 1234 LM Studio's)
  pool: int = 5               # models that answer: the best versions and swarm members
  keep_best: int = 2          # per run: its newest version and this many best by score
  policy: str = "thompson"    # the bandit that routes requests: thompson, ucb1 or egreedy
  explore: float = 0.1        # this fraction of requests goes to a model drawn uniformly
  discount: float = 0.999     # old ratings fade: a model remembers ~1/(1 - discount) of them
  state: str = ""             # the bandit's file ("": serve.json in the first run directory)
  token: str = ""             # bearer token the API requires ("": none; needed off loopback)
  reload_seconds: float = 5.0  # how often the runs are checked for new versions
  max_body_bytes: int = 65_536  # requests larger than this are refused (413)
  max_prompt_chars: int = 16_384
  default_tokens: int = 128   # tokens per answer when the request does not say
  max_tokens: int = 2048      # at most this many tokens per answer
  max_concurrent: int = 2     # generations at once; more wait up to queue_seconds, then 503
  queue_seconds: float = 30.0
  remember_answers: int = 10_000  # answers that can still be rated
  learn_from_use: bool = False  # prompts and liked answers go to the capture spool
  status_file: str = ""       # a daemon's status.json: at GET /api/status and on the page
                                # (capture.spool), redacted, for a learner that follows it


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
  """`streamlearn capture`: text from the user's environment, redacted, into a spool."""
  spool: str = ""             # the spool directory ("": checkpoints/<name>/captures)
  folders: tuple[str, ...] = ()  # watched directories (small text files)
  include: tuple[str, ...] = ()  # globs a file must match (empty: every file)
  exclude: tuple[str, ...] = ()  # globs never read (beyond the built-in sensitive places)
  push: str = ""              # "127.0.0.1:PORT" for POST /ingest ("": off)
  allow_remote_push: bool = False  # the push endpoint on an address other than loopback
  max_file_bytes: int = 1_048_576  # larger files are skipped (checked before reading)
  max_item_bytes: int = 262_144    # longer texts are split into items of at most this
  max_push_bytes: int = 1_048_576  # a larger push gets 413
  segment_bytes: int = 4_194_304   # a segment is sealed ("training ready") at 90% of this
  seal_seconds: float = 600.0  # ...or once its first item is this old (0: only when 90% full)
  min_free_mb: float = 256.0  # below this much free disk capture pauses, and resumes above it
  max_bytes: int = 1_073_741_824   # over this, the oldest learned segments are deleted (0: never)
  max_age_days: float = 0.0   # learned segments older than this are deleted (0: never)
  poll_seconds: float = 2.0   # folders are rescanned this often (watchdog wakes it sooner)
  settle_seconds: float = 1.0  # a file unchanged this long has finished being written
  screen_seconds: float = 0.0  # look at the screen this often (OCR when it changed; 0: off)
  window_blocklist: tuple[str, ...] = (  # regexes: a window whose title matches is never grabbed
      r"(?i)password|passwort|1password|bitwarden|keepass|lastpass|dashlane|enpass|keychain",
      r"(?i)private browsing|incognito|inprivate|private window|tor browser")


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
  """`streamlearn daemon`: capture, a learner following its spool, and the server, supervised."""
  dir: str = "~/.local/share/streamlearn"  # spool/, run/, backups/, logs/ and status.json
  capture: bool = True        # run capture (folders, push, screen: the [capture] section)
  serve: bool = True          # run the server ([serve]) once the learner has a version
  backup_every: str = "7d"    # a backup of the newest version this often: 90s, 10m, 6h, 7d, 2w
  keep_backups: int = 4       # backups kept; the oldest beyond this is deleted
  nice: int = 10              # the learner's OS priority is lowered by this (0-19)
  pause_on_battery: bool = True  # learning pauses while the machine runs on battery
  max_load: float = 1.5       # ...and while other programs' load per CPU stays above this (0: off)
  load_seconds: float = 60.0  # how long the load must stay above (or below) before it counts
  power_supply: str = "/sys/class/power_supply"  # where the battery is read (tests point elsewhere)
  loadavg: str = "/proc/loadavg"  # where the load is read (tests point elsewhere)
  stop_seconds: float = 120.0  # a child asked to stop is killed after this (the learner saves)
  log_bytes: int = 10_485_760  # logs/daemon.log is rotated at this size...
  log_files: int = 3          # ...keeping this many old ones


def parse_duration(text: str) -> float:
  """'90s', '10m', '6h', '7d', '2w' or a plain number of seconds -> seconds (> 0)."""
  units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
  text = text.strip().lower()
  scale = units.get(text[-1:], None)
  number = text[:-1] if scale else text
  try:
    seconds = float(number) * (scale or 1)
  except ValueError:
    raise ValueError(f"{text!r} is not a duration (e.g. 90s, 10m, 6h, 7d, 2w)") from None
  if not seconds > 0:
    raise ValueError(f"{text!r}: a duration must be > 0")
  return seconds


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "default"       # run name: the run directory is checkpoints/<name>/
  seed: int = 0               # parameter init and every random draw of the run
  model: ModelConfig = ModelConfig()
  match: MatchConfig = MatchConfig()
  counts: CountsConfig = CountsConfig()
  mixer: MixerConfig = MixerConfig()
  tokenizer: TokenizerConfig = TokenizerConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()
  safety: SafetyConfig = SafetyConfig()
  delta: DeltaConfig = DeltaConfig()
  replay: ReplayConfig = ReplayConfig()
  canary: CanaryConfig = CanaryConfig()
  swarm: SwarmConfig = SwarmConfig()
  serve: ServeConfig = ServeConfig()
  capture: CaptureConfig = CaptureConfig()
  daemon: DaemonConfig = DaemonConfig()
