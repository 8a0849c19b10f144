"""NaN/inf injected into the denoiser, a reward or the RDPO policy is caught at the step where it appears, and the
message names the step, the prompt and the seed of the first affected sample."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from epd.backbones.gmm import GMMBackbone, make_gmm
from epd.cli import main as cli_main
from epd.errors import EPDError, NonFiniteError
from epd.rdpo.trainer import MultiReward, RDPOConfig, RDPOTrainer
from epd.sample import sample_batch
from epd.solvers import SOLVERS, TABLE_POINTS, TABLE_SOLVERS
from epd.table import uniform_table

from .harness import visible_files

SEEDS = [101, 202, 303, 404, 505, 606]
PROMPTS = ["0", "1", "1", "0", "1", "0"]


class StepTracker:
    """Knows the solver step (the number of completed steps, from the solver's callback)."""

    def __init__(self):
        self.step = 0

    def __call__(self, info):
        self.step = info["i"] + 1


class PoisonedDenoiser:
    """Returns NaN (or inf) for batch row ``row`` from the first call made during solver step ``at_step`` on."""

    def __init__(self, inner, tracker, at_step, row, batch, value=float("nan")):
        self.inner, self.tracker, self.at_step = inner, tracker, at_step
        self.row, self.batch, self.value = row, batch, value
        self.passes_per_eval, self.coords = inner.passes_per_eval, inner.coords

    def __call__(self, x, sigma, cond=None):
        out = self.inner(x, sigma, cond)
        if self.tracker.step >= self.at_step:
            out = out.clone()
            out[[i for i in range(out.shape[0]) if i % self.batch == self.row]] = self.value  # all K stacked points
        return out


def _gmm():
    return GMMBackbone(make_gmm(dim=4, num_classes=2, per_class=1, seed=3), guidance=2.0)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("at_step,row,value", [(0, 0, float("nan")), (2, 3, float("inf")), (4, 5, float("nan"))])
def test_denoiser_nan_names_step_seed_prompt(solver, at_step, row, value):
    bb = _gmm()
    tracker = StepTracker()
    bb.denoiser = PoisonedDenoiser(bb.denoiser, tracker, at_step, row, len(SEEDS), value)
    sigmas = bb.sigmas(6)  # five steps
    table = uniform_table(6, TABLE_POINTS.get(solver, 2), meta={"afs": False}) if solver in TABLE_SOLVERS else None
    with pytest.raises(NonFiniteError) as e:
        sample_batch(bb, solver, SEEDS, PROMPTS, sigmas, table, callback=tracker)
    msg = str(e.value)
    assert f"at step {at_step} " in msg, msg
    assert f"seed {SEEDS[row]}, prompt {PROMPTS[row]!r}" in msg, msg


def test_clean_run_passes_the_same_checks():
    """Control: without poison every solver finishes (the checks do not fire on finite values)."""
    bb = _gmm()
    for solver in sorted(SOLVERS):
        table = uniform_table(6, TABLE_POINTS.get(solver, 2), meta={"afs": False}) if solver in TABLE_SOLVERS else None
        x, _, _ = sample_batch(bb, solver, SEEDS, PROMPTS, bb.sigmas(6), table)
        assert torch.isfinite(x).all()


def test_nan_weights_in_a_backbone_checkpoint_stop_sampling_at_step_0(ws, tmp_path, capsys):
    """A trained model file whose weights hold NaN: ``epd sample`` exits 2 naming step, seed and prompt and writes
    no image."""
    from safetensors.torch import load_file, save_file

    from epd.io import sha256_file

    bad = tmp_path / "digits_nan"
    shutil.copytree(ws.digits, bad)
    st = load_file(str(bad / "model.safetensors"))
    name = next(k for k in sorted(st) if k.endswith("bias") and st[k].numel())
    st[name][0] = float("nan")
    save_file(st, str(bad / "model.safetensors"))
    meta = json.loads((bad / "model.json").read_text())
    meta["sha256"] = sha256_file(bad / "model.safetensors")
    (bad / "model.json").write_text(json.dumps(meta))
    out = tmp_path / "samples"
    rc = cli_main(["sample", "--config", str(ws.config), "--backbone", "d", "--weights", str(bad), "--solver",
                   "heun", "--nfe", "6", "--seeds", "40-47", "--outdir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "NaN/inf at step 0" in err and "seed 40, prompt 'a handwritten digit zero'" in err, err
    assert not (out.exists() and visible_files(out))


def test_denoiser_nan_during_distillation_names_iteration(tmp_path):
    from epd.distill import DistillConfig, distill
    from epd.study import load_teacher, teacher_sigmas
    from epd.teacher import generate

    bb = _gmm()
    generate(bb, prompts=["0", "1"], seeds=list(range(64)), num_points=4, M=3, solver="heun", out_dir=tmp_path / "t",
             batch=64)
    student, _ = teacher_sigmas(bb, 4, 0)
    man, x, s = load_teacher(tmp_path / "t", student)
    calls = {"n": 0}
    inner = bb.denoiser

    class NaNFromIteration3:
        passes_per_eval, coords = inner.passes_per_eval, inner.coords

        def __call__(self, x, sigma, cond=None):
            calls["n"] += 1
            out = inner(x, sigma, cond)
            if calls["n"] > 2 * 5:  # 5 calls per iteration (3 EPD steps, AFS on the first): from iteration 3 on
                out = torch.where((cond == 1).reshape(-1, *[1] * (x.dim() - 1)).repeat(x.shape[0] // len(cond), 1),
                                  torch.full_like(out, float("nan")), out)
            return out

    bb.denoiser = NaNFromIteration3()
    with pytest.raises(NonFiniteError) as e:
        distill(bb, sigmas=student, x_init=x, targets=s, prompts=man["prompts"], num_points=2, afs=True,
                cfg=DistillConfig(iterations=5, batch=16, save_every=1), out_dir=tmp_path / "d", seeds=man["seeds"])
    msg = str(e.value)
    # call 11 is iteration 3's first: the K-point call of step 0 (AFS replaces the denoiser call at sigma_max)
    assert "at step 0 " in msg and "distill iteration 3, teacher trajectory" in msg and "prompt '1'" in msg, msg
    traj = int(msg.split("teacher trajectory ")[1].split(" ")[0])
    assert f"(seed {man['seeds'][traj]})" in msg and man["prompts"][traj] == "1"
    # the checkpoint of iteration 2 is what remains: nothing of the poisoned iteration was saved
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["iteration"] == 2


def test_nan_in_a_teacher_shard_names_shard_and_seed(tmp_path):
    from safetensors.torch import load_file, save_file

    from epd.study import load_teacher
    from epd.teacher import generate

    bb = _gmm()
    generate(bb, prompts=["0", "1"], seeds=list(range(100, 140)), num_points=4, M=1, solver="heun",
             out_dir=tmp_path, batch=16)
    shard = tmp_path / "shard-00001.safetensors"
    t = load_file(str(shard))
    t["states"][5, 1, 0] = float("inf")
    save_file(t, str(shard))
    with pytest.raises(EPDError, match=r"shard-00001\.safetensors: states holds NaN/inf for trajectory 21 "
                                       r"\(seed 121\)"):
        load_teacher(tmp_path)


# ---------------------------------------------------------------------------------------------- RDPO
class Reward:
    """``-|x|^2`` per GMM sample; NaN for image ``image`` in the rollout of step ``step`` (1-based)."""

    def __init__(self, step=None, image=None):
        self.step, self.image, self.trainer = step, image, None

    def __call__(self, images, prompts):
        r = -(images.double() ** 2).flatten(1).sum(1)
        rollout = len(prompts) == self.trainer.cfg.rollout_batch_size
        if rollout and self.step is not None and self.trainer.step + 1 == self.step:
            r[self.image] = float("nan")
        return r


def _rdpo(tmp_path, reward, steps=6):
    bb = _gmm()
    seeds_used = []
    noise = bb.noise
    bb.noise = lambda seeds, **kw: (seeds_used.append(list(seeds)), noise(seeds, **kw))[1]
    cfg = RDPOConfig(rollout_batch_size=8, rloo_k=4, minibatch_size=4, steps=steps, save_interval=2, eval_interval=2,
                     rewards={"digits_alignment": 1.0}, learning_rate=1e-3)
    table = uniform_table(4, 2, meta={"afs": True})
    tr = RDPOTrainer(bb, table, bb.sigmas(4), MultiReward(cfg.rewards, scorers={"digits_alignment": reward}),
                     ["0", "1", "1", "0"], ["0", "1"], [7, 8, 9], cfg, tmp_path)
    reward.trainer = tr
    return tr, seeds_used


def test_reward_nan_names_rdpo_step_prompt_seed(tmp_path):
    tr, seeds_used = _rdpo(tmp_path, Reward(step=3, image=5))
    with pytest.raises(NonFiniteError) as e:
        tr.train()
    msg = str(e.value)
    prompts = tr.prompts_for_step(2)
    rollout_seeds = [s for s in seeds_used if len(s) == 8][-1]
    assert f"at RDPO step 3 for image 5 (prompt {prompts[5]!r}, seed {rollout_seeds[5]})" in msg, msg
    assert torch.load(tmp_path / "checkpoints" / "trainer-state.pt", weights_only=True)["step"] == 2


def test_policy_loss_nan_names_step_and_minibatch(tmp_path, monkeypatch):
    tr, seeds_used = _rdpo(tmp_path, Reward())
    real = tr.policy.log_prob

    def log_prob(action, *a, **k):
        lp = real(action, *a, **k)
        if tr.step + 1 == 2 and lp.requires_grad:  # the PPO update of step 2
            lp = lp + float("nan")
        return lp

    monkeypatch.setattr(tr.policy, "log_prob", log_prob)
    with pytest.raises(NonFiniteError) as e:
        tr.train()
    msg = str(e.value)
    rollout_seeds = [s for s in seeds_used if len(s) == 8][-1]
    prompts = tr.prompts_for_step(1)
    assert "policy loss is NaN/inf at RDPO step 2" in msg, msg
    i = int(msg.split("minibatch: image ")[1].split(" ")[0])
    assert f"image {i} (seed {rollout_seeds[i]}, prompt {prompts[i]!r})" in msg, msg


def test_policy_parameters_turning_nan_are_caught_in_that_update(tmp_path):
    tr, _ = _rdpo(tmp_path, Reward())

    def poison(opt, args, kwargs):
        if tr.step + 1 == 3:
            with torch.no_grad():
                next(tr.policy.parameters()).view(-1)[0] = float("inf")

    tr.opt.register_step_post_hook(poison)
    with pytest.raises(NonFiniteError,
                       match=r"hold NaN/inf after the PPO update of RDPO step 3 .*seed \d+, prompt '[01]'"):
        tr.train()


def test_nan_policy_in_a_checkpoint_is_caught_before_the_next_rollout(tmp_path):
    tr, _ = _rdpo(tmp_path, Reward(), steps=4)
    tr.train(steps=2)
    state = torch.load(tmp_path / "checkpoints" / "trainer-state.pt", weights_only=True)
    k = next(n for n, _ in tr.policy.named_parameters())
    state["policy"][k] = torch.full_like(state["policy"][k], float("nan"))
    torch.save(state, tmp_path / "checkpoints" / "trainer-state.pt")
    tr2, _ = _rdpo(tmp_path, Reward(), steps=4)
    with pytest.raises(NonFiniteError, match=rf"policy parameters \['{k}'\] hold NaN/inf before the rollout of RDPO "
                                             r"step 3 \(images: RDPO step 3, image 0, seed \d+, prompt '[01]'"):
        tr2.train()


def test_metric_nan_names_image_seed_prompt(ws, refs, tmp_path, capsys, monkeypatch):
    import epd.rewards as R

    real = R.get_scorer

    def get_scorer(name, *a, **k):
        s = real(name, *a, **k)

        def poisoned(images, prompts):
            out = torch.as_tensor(s(images, prompts), dtype=torch.float64).clone()
            out[-1] = float("nan")  # the last image of every batch
            return out

        return poisoned

    monkeypatch.setattr(R, "get_scorer", get_scorer)
    out = tmp_path / "eval"
    rc = cli_main(["evaluate", "--images", str(refs("sample")), "--metrics", "digits_alignment", "--weights-dir",
                   str(ws.digits), "--out-dir", str(out), "--batch-size", "16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    side = json.loads((refs("sample") / "000015.json").read_text())
    assert f"for image 000015.png (seed 15, prompt {side['prompt']!r})" in err, err
    assert not out.exists() or not visible_files(out)
