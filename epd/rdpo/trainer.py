"""Stage 2: RDPO — PPO on the residual Dirichlet policy over an EPD table (spec §6), made resumable and honest.

Per PPO step:

1. Take ``B / k`` prompts from a stream shuffled by the run seed and repeat each ``k`` times (prompt-major);
   draw one latent seed per image. ``B`` is the global batch: under data parallelism (:mod:`epd.rdpo.ranks`)
   every rank draws the same prompts, seeds and tables and rolls out only its shard of the images.
2. Sample one complete table per image from the policy, run the EPD solver with it (no gradients), decode,
   and score with the weighted multi-reward (shared scorer registry).
3. Advantages by leave-one-out: standard per-prompt RLOO (``advantage="rloo"``: LOO inside each prompt's
   ``k`` images) or the original's mixed-prompt grouping (``advantage="legacy_mixed"``: rewards viewed as
   ``(k, B/k)``, LOO over axis 0), then normalised over the batch.
4. PPO clipped objective over ``ppo_epochs`` passes of shuffled minibatches, plus optional ``kl_coef * KL(pi ||
   pi_start)`` and ``- entropy_coef * H``; AdamW; gradient-norm clipping.

Checkpoints hold policy, optimizer, every RNG state, the step, the stopping state and the metrics so far, so a
killed or preempted run (:mod:`epd.rdpo.preempt`) continues exactly. A held-out prompt set (disjoint from the
final test prompts) with fixed seeds evaluates the policy mean every ``eval_interval`` steps and selects the best
checkpoint, which is exported as the RDPO table; a stopping rule on the same evaluations
(:mod:`epd.rdpo.stopping`: ``stop_rule`` plateau with ``stop_patience``/``stop_min_gain_se``, or trend with
``stop_window``/``stop_slope_se``) may end the run before ``steps``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import ConfigError, EPDError, NonFiniteError
from ..io import atomic_path, atomic_write_bytes, atomic_write_json, load_error_text
from ..memory import out_of_memory_names
from ..predictor import save
from ..solvers.epd import sample_epd
from ..table import EPDTable
from .policy import EPDParamPolicy
from .ranks import Ranks
from .stopping import RECORD_KEYS, STOP_KEYS, make_stopper

log = logging.getLogger(__name__)

__all__ = ["RDPOConfig", "MultiReward", "RDPOTrainer", "compute_advantages", "REWARD_NORMALIZERS"]

# Normalisation of each head before weighting (the original's reward_multi.py; digits rewards are used as is).
REWARD_NORMALIZERS = {
    "hps": (1.0, 0.0, 1.0),
    "pickscore": (1 / 26, 0.0, 1.0),
    "imagereward": (1 / 10, 0.0, 1.0),
    "clip": (1.0, 0.0, 1.0),
    "aesthetic": (1 / 10, 0.0, 1.0),
}


# Learning-rate factor at training progress ``t`` in [0, 1], ending at ``final`` (``lr_final_ratio``).
LR_SCHEDULES = {
    "constant": lambda t, final: 1.0,
    "linear": lambda t, final: 1.0 - (1.0 - final) * t,
    "cosine": lambda t, final: final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t)),
}


@dataclass
class RDPOConfig:
    """RDPO hyper-parameters; names follow the original YAML's ``ppo``/``logging`` sections where they overlap."""

    rollout_batch_size: int = 8
    rloo_k: int = 4
    ppo_epochs: int = 1
    minibatch_size: int = 4
    learning_rate: float = 7e-5
    clip_range: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    max_grad_norm: float = 1.0
    steps: int = 1000
    dirichlet_concentration: float = 20.0
    advantage: str = "rloo"
    hidden_dim: int = 128
    num_layers: int = 2
    train_scale_dir: bool | None = None
    train_scale_time: bool | None = None
    scale_std: float = 0.05
    save_interval: int = 50
    log_interval: int = 1
    eval_interval: int = 50
    eval_batch: int = 256
    guard_metric: str | None = None
    guard_max_ratio: float = 1.05
    stop_rule: str = "plateau"
    stop_patience: int = 0
    stop_min_gain_se: float = 0.0
    stop_window: int = 6
    stop_slope_se: float = 1.0
    lr_schedule: str = "constant"
    lr_final_ratio: float = 0.1
    seed: int = 0
    rewards: dict = field(default_factory=lambda: {"hps": 1.0})

    @classmethod
    def from_dict(cls, d: dict | None) -> "RDPOConfig":
        """Accepts our flat section or the original's nested layout (``ppo``, ``logging``, ``run``, ``reward``)."""
        d = dict(d or {})
        flat = {}
        for sect in ("ppo", "logging", "run"):
            flat.update(d.pop(sect, None) or {})
        reward = d.pop("reward", None)
        if reward is not None:
            weights = (reward.get("multi") or {}).get("weights") if isinstance(reward, dict) else None
            flat["rewards"] = weights or reward.get("weights") or {reward.get("type", "hps"): 1.0}
        d.pop("data", None)
        d.pop("model", None)
        flat.update(d)
        for ignored in ("decode_rgb", "output_root", "run_name", "timestamp", "run_id", "run_dir"):
            flat.pop(ignored, None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ConfigError(f"rdpo: unknown keys {unknown}; accepted: {sorted(known)}")
        cfg = cls(**flat)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.rloo_k < 2:
            raise ConfigError(f"rdpo.rloo_k: leave-one-out needs k >= 2, got {self.rloo_k}")
        if self.eval_batch < 1:
            raise ConfigError(f"rdpo.eval_batch: must be >= 1, got {self.eval_batch}")
        if self.rollout_batch_size % self.rloo_k:
            raise ConfigError(f"rdpo.rollout_batch_size ({self.rollout_batch_size}) must be divisible by "
                              f"rloo_k ({self.rloo_k})")
        if self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(f"rdpo.rollout_batch_size ({self.rollout_batch_size}) must be divisible by "
                              f"minibatch_size ({self.minibatch_size})")
        if self.advantage not in ("rloo", "legacy_mixed"):
            raise ConfigError(f"rdpo.advantage: {self.advantage!r}; accepted: 'rloo', 'legacy_mixed'")
        if not self.rewards or not any(w > 0 for w in self.rewards.values()):
            raise ConfigError("rdpo.rewards: need at least one reward with a positive weight")
        self.new_stopper()  # raises on bad values
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"rdpo.lr_schedule: {self.lr_schedule!r}; accepted: {sorted(LR_SCHEDULES)}")
        if not 0 <= self.lr_final_ratio <= 1:
            raise ConfigError(f"rdpo.lr_final_ratio: must be in [0, 1], got {self.lr_final_ratio}")

    def new_stopper(self):
        """A fresh stopper for the ``stop_*`` keys (:func:`~epd.rdpo.stopping.make_stopper`)."""
        return make_stopper(**{k: getattr(self, k) for k in STOP_KEYS})

    def lr_at(self, step: int) -> float:
        """Learning rate for PPO step ``step`` (0-based) under ``lr_schedule`` (stateless, so resume-exact)."""
        return self.learning_rate * LR_SCHEDULES[self.lr_schedule](min(step / max(self.steps - 1, 1), 1.0),
                                                                   self.lr_final_ratio)


class MultiReward:
    """``R = sum_m w_m norm_m(score_m) / sum_m max(w_m, 0)`` over registered scorers (heads with weight 0 skipped)."""

    def __init__(self, weights: dict[str, float], scorers: dict | None = None, **scorer_kw):
        from ..rewards import get_scorer, list_scorers

        known = {n for n, _ in list_scorers()}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ConfigError(f"rdpo.rewards: {unknown} are not registered scorers; registered: {sorted(known)}")
        self.weights = {k: float(v) for k, v in weights.items() if float(v) != 0}
        self.scorers = scorers or {n: get_scorer(n, **scorer_kw) for n in self.weights}
        self.total = sum(max(w, 0.0) for w in self.weights.values())

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        heads, acc = {}, 0
        for name, w in self.weights.items():
            s = torch.as_tensor(self.scorers[name](images, prompts), dtype=torch.float64).reshape(-1)
            heads[name] = s
            scale, lo, hi = REWARD_NORMALIZERS.get(name, (1.0, -math.inf, math.inf))
            acc = acc + w * (s * scale).clamp(lo, hi)
        return acc / self.total, heads


def compute_advantages(rewards: torch.Tensor, k: int, mode: str = "rloo") -> torch.Tensor:
    """Leave-one-out advantages normalised over the batch.

    ``rewards`` are prompt-major (``[p0 x k, p1 x k, ...]``). ``rloo``: baseline = mean of the other ``k - 1``
    images of the same prompt. ``legacy_mixed``: the original's ``reshape(k, B/k)`` with LOO over axis 0, whose
    groups mix different prompts (kept for reproduction).
    """
    B = rewards.numel()
    if B % k:
        raise ConfigError(f"rollout batch {B} is not divisible by the group size k={k}")
    r = rewards.reshape(B // k, k) if mode == "rloo" else rewards.reshape(k, B // k)
    axis = 1 if mode == "rloo" else 0
    loo = (r.sum(axis, keepdim=True) - r) / (k - 1)
    adv = (r - loo).reshape(-1)
    return (adv - adv.mean()) / adv.std(unbiased=False).clamp_min(1e-8)


class RDPOTrainer:
    """PPO trainer for :class:`~epd.rdpo.policy.EPDParamPolicy` on one backbone.

    Args:
        backbone: a :class:`~epd.backbones.base.Backbone`.
        start_table (`EPDTable`): the table to start from (Stage-1 output).
        sigmas (`torch.Tensor`): the table's grid.
        reward (:class:`MultiReward`): reward function ``(images, prompts) -> (R, heads)``.
        train_prompts / eval_prompts (`list[str]`): rollout stream and held-out selection set (disjoint).
        eval_seeds (`list[int]`): fixed seeds for held-out evaluation (paired across checkpoints).
        cfg (:class:`RDPOConfig`), out_dir: run folder (``checkpoints/``, ``metrics.jsonl``, exported tables,
            ``stop.json``).
        rank / world (`int`): this process among ``world`` data-parallel ones (see :mod:`epd.rdpo.ranks`; the
            process group must be initialised); rank 0 alone writes files and logs.
        guard (`callable`, *optional*): ``guard(images) -> float`` (lower is better, e.g. digits-FD against held-out
            real data) evaluated on the held-out images; a checkpoint is selected only while its value stays within
            ``guard_max_ratio`` of the start table's (guards the selection against reward hacking).
        shard_update (`bool`): split each PPO minibatch over the ranks and all-reduce the gradients instead of
            every rank computing the (cheap) policy update on the whole minibatch; see :meth:`_minibatch`.
        preempt (*optional*): an object whose ``signum`` becomes a signal number when the run must checkpoint and
            stop (:class:`~epd.rdpo.preempt.PreemptSignal`); after :meth:`train`, ``self.preempted`` holds it.
    """

    def __init__(self, backbone, start_table: EPDTable, sigmas: torch.Tensor, reward, train_prompts: list[str],
                 eval_prompts: list[str], eval_seeds: list[int], cfg: RDPOConfig, out_dir: str | Path,
                 rank: int = 0, world: int = 1, run=None, guard=None, preempt=None, shard_update: bool = False):
        cfg.check()
        self._check_inputs(start_table, sigmas, train_prompts, eval_prompts, eval_seeds, cfg, world, shard_update)
        self.bb, self.start, self.sigmas, self.reward = backbone, start_table, sigmas, reward
        self.train_prompts, self.eval_prompts, self.eval_seeds = train_prompts, eval_prompts, eval_seeds
        self.cfg, self.out, self.ranks, self.run = cfg, Path(out_dir), Ranks(rank, world), run
        self.guard, self.guard_ref, self.last_guard = guard, None, None
        self.preempt, self.preempted, self._saved_step = preempt, None, None
        self.shard_update = bool(shard_update) and world > 1
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "checkpoints").mkdir(exist_ok=True)
        with torch.random.fork_rng(devices=[]):  # initialisation depends on the run seed only
            torch.manual_seed(cfg.seed)
            self.policy = EPDParamPolicy.from_table(
                start_table, cfg.dirichlet_concentration, hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers,
                train_scale_dir=cfg.train_scale_dir, train_scale_time=cfg.train_scale_time, scale_std=cfg.scale_std)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0)
        # the same streams on every rank: each draws the global batch and keeps its shard
        self.g_policy = torch.Generator().manual_seed(cfg.seed * 1000003)
        self.g_seeds = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
        self.g_update = torch.Generator().manual_seed(cfg.seed * 104729 + 29)
        self.step = 0
        self.best = {"step": 0, "reward": -math.inf}
        self.stopper = cfg.new_stopper()
        self.history: list[dict] = []
        self._perm = torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(cfg.seed))

    @staticmethod
    def _check_inputs(start_table, sigmas, train_prompts, eval_prompts, eval_seeds, cfg, world, shard_update) -> None:
        if start_table.num_steps != len(sigmas):
            raise ConfigError(f"start table has num_steps={start_table.num_steps}, grid has {len(sigmas)} points")
        limit = min(cfg.minibatch_size, len(eval_seeds)) if shard_update else len(eval_seeds)
        if world > limit:
            raise ConfigError(f"--gpus {world}: every process needs a share of the held-out seeds ({len(eval_seeds)})"
                              + (f" and of each PPO minibatch (rdpo.minibatch_size={cfg.minibatch_size})"
                                 if shard_update else "") + f"; use at most {limit} processes")
        overlap = set(train_prompts) & set(eval_prompts)
        if overlap and len(set(train_prompts)) > len(overlap):
            log.warning("%d held-out evaluation prompts also appear in the rollout stream", len(overlap))

    # ------------------------------------------------------------------ prompts and seeds
    def prompts_for_step(self, step: int) -> list[str]:
        """Prompt-major global batch for PPO step ``step`` (0-based): ``B/k`` prompts, each k times."""
        n_prompts = self.cfg.rollout_batch_size // self.cfg.rloo_k
        L = len(self._perm)
        out = []
        for j in range(n_prompts):
            p = self.train_prompts[int(self._perm[(step * n_prompts + j) % L])]
            out += [p] * self.cfg.rloo_k
        return out

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> dict:
        """Sample the global batch's tables, roll out and score this rank's shard, gather the rewards."""
        B = len(prompts)
        seeds = torch.randint(0, 2**31 - 1, (B,), generator=self.g_seeds).tolist()
        labels = [f"RDPO step {self.step + 1}, image {i}, seed {s}, prompt {p!r}"
                  for i, (s, p) in enumerate(zip(seeds, prompts))]
        self._check_policy(f"before the rollout of RDPO step {self.step + 1} (images: {labels[0]}, ...)")
        action = self.policy.sample(B, generator=self.g_policy)
        drawn = [t for t in (action.positions, action.weights, action.scale_dir, action.scale_time) if t is not None]
        bad = sorted({i for t in drawn for i in (~torch.isfinite(t.flatten(1))).any(1).nonzero().flatten().tolist()})
        if bad:
            raise NonFiniteError(f"policy sampled a NaN/inf table for {labels[bad[0]]} ({len(bad)} of {B} images)")
        old_logp = self.policy.log_prob(action).detach()
        own = self.ranks.shard(B)
        R, heads = self._score(action[own], seeds[own], prompts[own], labels[own])
        R, heads = self.ranks.cat(R), {k: self.ranks.cat(v) for k, v in heads.items()}
        bad = (~torch.isfinite(R)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise NonFiniteError(f"reward is NaN/inf at RDPO step {self.step + 1} for image {i} "
                                 f"(prompt {prompts[i]!r}, seed {seeds[i]}); heads: "
                                 f"{ {k: float(v[i]) for k, v in heads.items()} }")
        return {"action": action, "old_logp": old_logp, "rewards": R, "heads": heads, "seeds": seeds,
                "prompts": prompts}

    def _score(self, action, seeds: list[int], prompts: list[str], labels: list[str]):
        x = self.bb.noise(seeds, sigma=float(self.sigmas[0]))
        cond = self.bb.prepare(prompts)
        out = sample_epd(self.bb.denoiser, x, self.sigmas.to(x.dtype), cond=cond,
                         table=action.tables(self.start.meta), afs=bool(self.start.meta.get("afs")),
                         context=labels)
        return self.reward(self.bb.decode(out.x), prompts)

    def _check_policy(self, when: str) -> None:
        bad = [n for n, p in self.policy.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(f"policy parameters {bad[:4]} hold NaN/inf {when}")

    @staticmethod
    def _describe(batch: dict, idx) -> str:
        seeds, prompts = batch.get("seeds"), batch.get("prompts")
        rows = idx.tolist()[:4]
        return ", ".join(f"image {i} (seed {seeds[i] if seeds else '?'}, prompt {prompts[i] if prompts else '?'!r})"
                         for i in rows) + (" ..." if len(idx) > 4 else "")

    # ------------------------------------------------------------------ update
    def update(self, batch: dict) -> dict:
        cfg = self.cfg
        adv = compute_advantages(batch["rewards"], cfg.rloo_k, cfg.advantage).float()
        B = adv.numel()
        if cfg.lr_schedule != "constant":
            for g in self.opt.param_groups:
                g["lr"] = cfg.lr_at(self.step)
        stats = {"loss": [], "policy_loss": [], "kl": [], "ratio": [], "clip_fraction": [], "grad_norm": [],
                 "entropy": []}
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=self.g_update)
            for i in range(0, B, cfg.minibatch_size):
                for k, v in self._minibatch(batch, adv, perm[i:i + cfg.minibatch_size]).items():
                    stats[k].append(v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def _minibatch(self, batch: dict, adv: torch.Tensor, idx: torch.Tensor) -> dict:
        """One clipped-PPO step on minibatch ``idx`` (global indices). Every rank holds the whole batch (tables,
        log-probabilities, gathered rewards), so by default each computes the same update as one process, bit for
        bit. With ``shard_update`` a rank takes every ``world``-th image, its loss is its share of the minibatch
        mean and the gradients are summed over the ranks (less policy work per rank, float32 summation order
        differs from one process: about 1e-6 on the tables after a few steps)."""
        cfg, w = self.cfg, (self.ranks.world if self.shard_update else 1)
        mine = idx if w == 1 else idx[self.ranks.rank::w]
        share = (lambda t: t.mean()) if w == 1 else (lambda t: t.sum() / len(idx))  # noqa: E731
        ratio = torch.exp(self.policy.log_prob(batch["action"][mine]) - batch["old_logp"][mine])
        a = adv[mine]
        clipped = torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range)
        policy_loss = share(torch.max(-a * ratio, -a * clipped))
        kl = self.policy.kl_to_base()
        ent = self.policy.entropy()
        loss = policy_loss + cfg.kl_coef * kl.mean() / w - cfg.entropy_coef * ent.mean() / w
        if not torch.isfinite(loss):
            raise NonFiniteError(f"policy loss is NaN/inf at RDPO step {self.step + 1} "
                                 f"(ratio {ratio.tolist()}, advantages {a.tolist()}); minibatch: "
                                 f"{self._describe(batch, mine)}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.shard_update:
            self.ranks.sum_grads(self.policy.parameters())
        gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.opt.step()
        self._check_policy(f"after the PPO update of RDPO step {self.step + 1} (gradient norm {float(gn):.4g};"
                           f" minibatch: {self._describe(batch, idx)})")
        clip = ((ratio - 1).abs() > cfg.clip_range).float()
        summed = [loss.item(), policy_loss.item(), share(ratio).item(), share(clip).item()]
        summed = self.ranks.sum(summed) if self.shard_update else summed
        return {"loss": summed[0], "policy_loss": summed[1], "kl": kl.mean().item(), "ratio": summed[2],
                "clip_fraction": summed[3], "grad_norm": float(gn), "entropy": ent.mean().item()}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, table: EPDTable) -> tuple[float, torch.Tensor]:
        """Mean reward of a fixed table on the held-out prompts and seeds (paired across calls; sharded over the
        ranks, every rank returns the full result)."""
        from ..prompts import pair

        own = self.ranks.shard(len(self.eval_seeds))
        seeds, prompts = self.eval_seeds[own], pair(self.eval_prompts, self.eval_seeds)[own]
        rs, imgs = [], []
        n = self.cfg.eval_batch
        for i in range(0, len(seeds), n):
            with out_of_memory_names("rdpo.eval_batch", n, "the held-out evaluation"):
                r, images = self._eval_batch(table, seeds[i:i + n], prompts[i:i + n])
            rs.append(r)
            if self.guard is not None:
                imgs.append(images.cpu())
        r = self.ranks.cat(torch.cat(rs))
        self.last_guard = float(self.guard(self.ranks.cat(torch.cat(imgs)))) if self.guard is not None else None
        return float(r.mean()), r

    def _eval_batch(self, table: EPDTable, seeds: list[int], prompts: list[str]):
        labels = [f"held-out evaluation after RDPO step {self.step}, seed {a}, prompt {b!r}" for a, b in zip(seeds, prompts)]
        x = self.bb.noise(seeds, sigma=float(self.sigmas[0]))
        out = sample_epd(self.bb.denoiser, x, self.sigmas.to(x.dtype), cond=self.bb.prepare(prompts), table=table,
                         context=labels)
        images = self.bb.decode(out.x)
        r = self.reward(images, prompts)[0]
        bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(f"reward is NaN/inf in the {labels[bad[0]]}")
        return r.detach().cpu(), images

    def _guard_ok(self) -> bool:
        if self.guard is None or self.guard_ref is None or self.last_guard is None:
            return True
        return self.last_guard <= self.cfg.guard_max_ratio * self.guard_ref

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"policy": self.policy.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "g_policy": self.g_policy.get_state(), "g_seeds": self.g_seeds.get_state(),
                "g_update": self.g_update.get_state(), "best": dict(self.best), "history_len": len(self.history),
                "stopper": self.stopper.state_dict(),
                "config": json.dumps(asdict(self.cfg))}

    def save_checkpoint(self) -> None:
        """Write the trainer state (rank 0; each file atomically). ``metrics.jsonl`` goes first and the resumable
        state last: a kill in between leaves the previous state, which reads only its own ``history_len`` records."""
        self._saved_step = self.step
        if not self.ranks.main:
            return
        self._write_history()
        ck = self.out / "checkpoints"
        for name, obj in ((f"policy-step{self.step:06d}.pt", self.policy.state_dict()),  # the original's layout
                          ("trainer-state.pt", self._state())):
            buf = io.BytesIO()  # serialised in memory, so a full disk is reported as such (see atomic_path)
            torch.save(obj, buf)
            atomic_write_bytes(ck / name, buf.getvalue())

    def _write_history(self) -> None:
        with atomic_path(self.out / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))

    def _load_state(self, path: Path) -> dict:
        try:
            st = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
            raise EPDError(f"{path}: cannot resume ({load_error_text(e)}); delete the run folder to start "
                           "over") from None
        need = ("policy", "opt", "step", "g_policy", "g_seeds", "g_update", "best", "history_len", "config")
        if not isinstance(st, dict) or any(k not in st for k in need):
            raise EPDError(f"{path}: not an RDPO trainer state (expected keys {list(need)}); delete the run folder "
                           "to start over")
        saved, now = json.loads(st["config"]), json.loads(json.dumps(asdict(self.cfg)))
        defaults = json.loads(json.dumps(asdict(RDPOConfig())))  # keys added since the state was written
        if {**{k: defaults[k] for k in now if k not in saved}, **saved} != now:
            raise ConfigError(f"{path}: was written with a different rdpo config; use a new run folder")
        return st

    def try_resume(self) -> bool:
        path = self.out / "checkpoints" / "trainer-state.pt"
        if not path.exists():
            return False
        st = self._load_state(path)
        try:
            self.policy.load_state_dict(st["policy"])
        except RuntimeError as e:
            raise EPDError(f"{path}: policy does not match this table (K or steps differ): {e}") from None
        self.opt.load_state_dict(st["opt"])
        for name in ("g_policy", "g_seeds", "g_update"):
            getattr(self, name).set_state(st[name])
        self.step, self.best = int(st["step"]), dict(st["best"])
        if "stopper" in st:
            self.stopper.load_state_dict(st["stopper"])
        hist = self.out / "metrics.jsonl"
        if hist.exists():
            self.history = [json.loads(line) for line in hist.read_text().splitlines() if line.strip()]
        self.history = self.history[: int(st["history_len"])]
        self._saved_step = self.step
        log.info("resumed RDPO at step %d", self.step)
        return True

    # ------------------------------------------------------------------ main loop
    def train(self, steps: int | None = None) -> dict:
        """Run (or resume) PPO up to ``steps``, the plateau rule or a preemption signal; returns the best
        checkpoint's ``{"step", "reward", "guard"}``. After a preemption ``self.preempted`` is the signal."""
        steps = steps or self.cfg.steps
        self.try_resume()
        if self.step == 0:
            self._evaluate_start()
        self._set_guard_ref()
        t0 = time.time()
        bar = tqdm(desc="rdpo", initial=self.step, total=steps, unit="step", disable=not self.ranks.main)
        while self.step < steps and self.stopper.stopped_at is None:
            rec = self._train_step(steps, t0)
            bar.update(1)
            bar.set_postfix(reward=f"{rec['mixed_reward_mean']:.4g}", kl=f"{rec['kl']:.3g}")
            sig = self.ranks.max_int(getattr(self.preempt, "signum", None) or 0)
            if sig:
                if self._saved_step != self.step:
                    self.save_checkpoint()
                self.ranks.barrier()
                self.preempted = sig
                log.warning("signal %d: checkpointed RDPO at step %d in %s; run the same command to resume",
                            sig, self.step, self.out)
                return self.best
        bar.close()
        self._finish(steps)
        return self.best

    def _evaluate_start(self) -> None:
        r0, rewards = self.evaluate(self.start)
        self.best = {"step": 0, "reward": r0, "guard": self.last_guard}
        self.stopper.start(rewards, 0)
        self._export(self.start, "best", {"step": 0, "eval_reward": r0, "eval_guard": self.last_guard})
        self.history.append({"step": 0, "eval_reward": r0, **({"eval_guard": self.last_guard}
                                                             if self.last_guard is not None else {})})

    def _set_guard_ref(self) -> None:
        if self.guard is not None:
            self.guard_ref = self.best.get("guard") if self.best.get("step") == 0 else next(
                (h["eval_guard"] for h in self.history if h.get("step") == 0 and "eval_guard" in h), None)

    def _train_step(self, steps: int, t0: float) -> dict:
        """One PPO step (rollout, update), its evaluation when due, logging and checkpointing."""
        batch = self.rollout(self.prompts_for_step(self.step))
        stats = self.update(batch)
        self.step += 1
        rec = {"step": self.step, **stats, "mixed_reward_mean": float(batch["rewards"].mean()),
               "mixed_reward_std": float(batch["rewards"].std(unbiased=False)),
               **{f"{k}_mean": float(v.mean()) for k, v in batch["heads"].items()},
               "elapsed_sec": round(time.time() - t0, 3)}
        if self.step % self.cfg.eval_interval == 0 or self.step == steps:
            self._evaluate_step(rec)
        self.history.append(rec)
        if self.run is not None and self.ranks.main and self.step % self.cfg.log_interval == 0:
            self.run.metrics({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"},
                             step=self.step)
        if (self.step % self.cfg.save_interval == 0 or self.step == steps
                or self.stopper.stopped_at is not None):
            self.save_checkpoint()
        return rec

    def _evaluate_step(self, rec: dict) -> None:
        mean_table = self.policy.mean_table(meta=self.start.meta)
        rec["eval_reward"], rewards = self.evaluate(mean_table)
        if self.last_guard is not None:
            rec["eval_guard"] = self.last_guard
        guard_ok = self._guard_ok()
        if rec["eval_reward"] > self.best["reward"] and guard_ok:
            self.best = {"step": self.step, "reward": rec["eval_reward"], "guard": self.last_guard}
            self._export(mean_table, "best", {"step": self.step, "eval_reward": rec["eval_reward"],
                                              "eval_guard": self.last_guard})
        if self.stopper.ref is None:  # resumed from a state written before the rule: it counts from here
            self.stopper.start(rewards, self.step)
            return
        if self.stopper.update(self.step, rewards, guard_ok):
            log.info("RDPO stops at step %d: %s", self.step, self.stopper.reason)
        if math.isfinite(self.stopper.log[-1]["gain_se"]):
            rec["eval_gain_se"] = self.stopper.log[-1]["gain_se"]

    def stop_record(self, steps: int) -> dict:
        """What ``stop.json`` holds: the selected checkpoint, where and why training ended, the evaluations."""
        finite = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None  # noqa: E731
        return {"selected_step": self.best["step"], "selected_eval_reward": self.best["reward"],
                "stopped_at": self.step, "steps": steps,
                "reason": self.stopper.reason or f"budget: ran all {steps} steps (rdpo.steps)",
                "rollouts": self.step * self.cfg.rollout_batch_size,
                **{k: getattr(self.cfg, k) for k in RECORD_KEYS[self.cfg.stop_rule]},
                "evaluations": [{k: finite(v) for k, v in e.items()} for e in self.stopper.log]}

    def _finish(self, steps: int) -> None:
        final = self.policy.mean_table(meta=self.start.meta)
        self._export(final, "final", {"step": self.step})
        if not self.ranks.main:
            return
        stop = self.stop_record(steps)
        atomic_write_json(self.out / "stop.json", stop)
        atomic_write_json(self.out / "summary.json", {"best": self.best, "steps": self.step,
                                                      "config": asdict(self.cfg)})
        if self.run is not None:
            self.run.metrics({"selected_step": stop["selected_step"], "stopped_at": stop["stopped_at"],
                              "rollouts": stop["rollouts"]})
            self.run.tags({"selected_step": stop["selected_step"], "stop_reason": stop["reason"]})
            self.run.artifact(self.out / "stop.json")

    def _export(self, table: EPDTable, name: str, info: dict) -> None:
        if not self.ranks.main:
            return
        t = EPDTable(table.positions, table.weights, table.scale_dir, table.scale_time, meta=table.meta,
                     provenance={"stage": "rdpo", "selection": "held-out eval reward" if name == "best" else "last",
                                 **info})
        save(t, self.out / f"table_{name}")
