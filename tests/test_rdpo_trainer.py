"""RDPO trainer: advantages, convergence on a bandit with a known optimum, exact resume, bad input."""

import math

import pytest
import torch

from epd.backbones.gmm import GMMBackbone, make_gmm
from epd.errors import ConfigError, EPDError, NonFiniteError
from epd.rdpo.trainer import MultiReward, RDPOConfig, RDPOTrainer, compute_advantages
from epd.table import EPDTable, uniform_table

TARGET_POS = torch.tensor([[0.15, 0.45]])
TARGET_W = torch.tensor([[0.75, 0.25]])


def test_rloo_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 12.0, 16.0])  # two prompts x k=4, prompt-major
    a = compute_advantages(r, 4, "rloo")
    raw = torch.tensor([1 - 3, 2 - 8 / 3, 3 - 7 / 3, 4 - 2, 10 - 38 / 3, 10 - 38 / 3, 12 - 12, 16 - 32 / 3])
    assert torch.allclose(a, (raw - raw.mean()) / raw.std(unbiased=False), atol=1e-6)
    # legacy: groups {0,2,4,6} and {1,3,5,7} (reshape (k, B/k), LOO over axis 0)
    b = compute_advantages(r, 4, "legacy_mixed")
    g = r.reshape(4, 2)
    raw2 = (g - (g.sum(0, keepdim=True) - g) / 3).reshape(-1)
    assert torch.allclose(b, (raw2 - raw2.mean()) / raw2.std(unbiased=False), atol=1e-6)
    assert not torch.allclose(a, b)


class BanditTrainer(RDPOTrainer):
    """Reward depends only on the sampled table: maximal at (TARGET_POS, TARGET_W)."""

    def rollout(self, prompts):
        B = len(prompts)
        action = self.policy.sample(B, generator=self.g_policy)
        old = self.policy.log_prob(action).detach()
        r = -((action.positions - TARGET_POS) ** 2).sum((1, 2)) - ((action.weights - TARGET_W) ** 2).sum((1, 2))
        r = r.double()
        return {"action": action, "old_logp": old, "rewards": r, "heads": {"bandit": r}, "seeds": [0] * B}

    def evaluate(self, table):
        v = -float(((table.positions - TARGET_POS.double()) ** 2).sum() + ((table.weights - TARGET_W.double()) ** 2).sum())
        return v, torch.tensor([v])


def _trainer(tmp_path, steps=40, cls=BanditTrainer, **kw):
    cfg = RDPOConfig(rollout_batch_size=32, rloo_k=4, minibatch_size=8, learning_rate=2e-3, steps=steps,
                     dirichlet_concentration=30.0, save_interval=kw.pop("save_interval", 10), eval_interval=10,
                     rewards={"digits_alignment": 1.0}, **kw)
    bb = GMMBackbone(make_gmm(dim=4, num_classes=2, per_class=1, seed=0))
    table = uniform_table(2, 2, meta={"afs": False})
    return cls(bb, table, bb.sigmas(2), reward=None, train_prompts=["0", "1"], eval_prompts=["0"], eval_seeds=[1],
               cfg=cfg, out_dir=tmp_path)


def test_bandit_converges_to_known_optimum(tmp_path):
    tr = _trainer(tmp_path, steps=150, save_interval=150)
    start = tr.policy.mean_table()
    err0 = float((start.positions - TARGET_POS.double()).abs().max())
    tr.train()
    t = tr.policy.mean_table()
    assert float((t.positions - TARGET_POS.double()).abs().max()) < 0.06 < err0
    assert float((t.weights - TARGET_W.double()).abs().max()) < 0.06
    assert tr.best["step"] > 0


def test_resume_matches_uninterrupted(tmp_path):
    full = _trainer(tmp_path / "full", steps=6, save_interval=1)
    full.train()
    class Killed(BanditTrainer):
        def rollout(self, prompts):
            if self.step == 3:  # the process dies during step 4, after step 3's checkpoint
                raise KeyboardInterrupt
            return super().rollout(prompts)

    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "part", steps=6, save_interval=1, cls=Killed).train()
    resumed = _trainer(tmp_path / "part", steps=6, save_interval=1)
    resumed.train()
    for k, v in full.policy.state_dict().items():
        assert torch.equal(v, resumed.policy.state_dict()[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "elapsed_sec"} for r in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)


def test_first_minibatch_ratio_is_one(tmp_path):
    tr = _trainer(tmp_path)
    batch = tr.rollout(["0"] * 32)
    ratio = torch.exp(tr.policy.log_prob(batch["action"]) - batch["old_logp"])
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0, rtol=0)


def test_bad_config_and_rewards(tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        RDPOConfig(rollout_batch_size=10, rloo_k=4).check()
    with pytest.raises(ConfigError, match="k >= 2"):
        RDPOConfig(rloo_k=1).check()
    with pytest.raises(ConfigError, match="unknown keys"):
        RDPOConfig.from_dict({"ppo": {"rollout_batch_sz": 8}})
    with pytest.raises(ConfigError, match="not registered"):
        MultiReward({"no_such_reward": 1.0})
    with pytest.raises(ConfigError, match="advantage"):
        RDPOConfig(advantage="mixed").check()


def test_original_yaml_layout_is_accepted():
    cfg = RDPOConfig.from_dict({"ppo": {"rollout_batch_size": 8, "rloo_k": 4, "minibatch_size": 4,
                                        "dirichlet_concentration": 20.0, "decode_rgb": True, "steps": 99999},
                                "logging": {"log_interval": 1, "save_interval": 500},
                                "run": {"seed": 0, "run_name": "sd15_k20"},
                                "reward": {"type": "multi", "multi": {"weights": {"hps": 1.0, "clip": 0.0}}}})
    assert cfg.dirichlet_concentration == 20.0 and cfg.save_interval == 500 and cfg.rewards["hps"] == 1.0


def test_nan_reward_names_step_prompt_and_seed(tmp_path):
    class NaNReward:
        def __call__(self, images, prompts):
            r = torch.zeros(len(prompts), dtype=torch.float64)
            r[3] = math.nan
            return r, {"x": r}

    tr = _trainer(tmp_path, cls=RDPOTrainer)
    tr.reward = NaNReward()
    with pytest.raises(NonFiniteError, match=r"step 1 .*image 3.*prompt '0'.*seed"):
        tr.rollout(["0"] * 32)


def test_resume_with_other_table_shape_refused(tmp_path):
    tr = _trainer(tmp_path, steps=2, save_interval=1)
    tr.train()
    cfg = tr.cfg
    bb = tr.bb
    other = RDPOTrainer(bb, uniform_table(5, 3, meta={"afs": False}), bb.sigmas(5), None, ["0"], ["0"], [1], cfg,
                        tmp_path)
    with pytest.raises(Exception, match="K or steps differ|size mismatch"):
        other.try_resume()


def test_table_row_shapes_per_image(tmp_path):
    tr = _trainer(tmp_path)
    act = tr.policy.sample(5, generator=torch.Generator().manual_seed(0))
    tabs = act.tables({})
    row = tabs.row(0)
    assert row["positions"].shape == (5, 2) and (row["positions"][:, 1] > row["positions"][:, 0]).all()
    assert torch.allclose(row["weights"].sum(1), torch.ones(5))
    _ = EPDTable


class _SumReward:
    """A per-image reward with no batch interaction: the mean pixel."""

    def __call__(self, images, prompts):
        r = images.flatten(1).double().mean(1)
        return r, {"mean": r}


def _eval_trainer(tmp_path, eval_batch):
    cfg = RDPOConfig(rollout_batch_size=8, rloo_k=4, minibatch_size=4, steps=1, eval_batch=eval_batch,
                     rewards={"digits_alignment": 1.0})
    bb = GMMBackbone(make_gmm(dim=4, num_classes=2, per_class=1, seed=0))
    return RDPOTrainer(bb, uniform_table(3, 2, meta={"afs": False}), bb.sigmas(3), _SumReward(), ["0", "1"],
                       ["0", "1"], list(range(10, 17)), cfg, tmp_path / str(eval_batch))


def test_held_out_evaluation_is_batched_by_eval_batch_without_changing_scores(tmp_path):
    """Peak memory follows rdpo.eval_batch; the paired per-seed rewards do not depend on it."""
    calls = {}
    results = {}
    for n in (7, 3, 1):
        tr = _eval_trainer(tmp_path, n)
        sizes = []
        orig = tr._eval_batch
        tr._eval_batch = lambda table, s, p, orig=orig, sizes=sizes: (sizes.append(len(s)), orig(table, s, p))[1]
        results[n] = tr.evaluate(tr.start)
        calls[n] = sizes
    assert calls == {7: [7], 3: [3, 3, 1], 1: [1] * 7}
    assert torch.equal(results[7][1], results[3][1]) and torch.equal(results[7][1], results[1][1])
    with pytest.raises(ConfigError, match="rdpo.eval_batch"):
        RDPOConfig(eval_batch=0).check()


def test_out_of_memory_in_evaluation_names_the_setting(tmp_path):
    tr = _eval_trainer(tmp_path, 4)

    class OutOfMemoryError(RuntimeError):  # what torch.cuda raises (torch.OutOfMemoryError), by name
        pass

    def boom(*a, **k):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 10.00 GiB")

    tr._eval_batch = boom
    with pytest.raises(EPDError, match=r"held-out evaluation: out of GPU memory at rdpo.eval_batch=4 .*lower "
                                       r"rdpo.eval_batch \(e.g. 2\)"):
        tr.evaluate(tr.start)


def test_lr_schedules_start_at_the_rate_and_end_at_the_final_ratio():
    assert [RDPOConfig(learning_rate=2.0, steps=11).lr_at(s) for s in (0, 5, 10)] == [2.0, 2.0, 2.0]
    for name in ("linear", "cosine"):
        cfg = RDPOConfig(learning_rate=2.0, steps=11, lr_schedule=name, lr_final_ratio=0.1)
        assert cfg.lr_at(0) == pytest.approx(2.0) and cfg.lr_at(10) == pytest.approx(0.2)
        assert cfg.lr_at(5) == pytest.approx(2.0 * 0.55)  # half-way: both are at the mean of 1 and 0.1
    assert RDPOConfig(learning_rate=2.0, steps=11, lr_schedule="cosine", lr_final_ratio=0.1).lr_at(2) > \
        RDPOConfig(learning_rate=2.0, steps=11, lr_schedule="linear", lr_final_ratio=0.1).lr_at(2)
    with pytest.raises(ConfigError, match="rdpo.lr_schedule"):
        RDPOConfig(lr_schedule="step").check()
    with pytest.raises(ConfigError, match="rdpo.lr_final_ratio"):
        RDPOConfig(lr_final_ratio=1.5).check()


def test_state_written_before_the_new_keys_resumes_at_their_defaults(tmp_path):
    import json

    _trainer(tmp_path, steps=2, save_interval=1).train()
    path = tmp_path / "checkpoints" / "trainer-state.pt"
    st = torch.load(path, weights_only=True)
    old = {k: v for k, v in json.loads(st["config"]).items() if not k.startswith(("stop_", "lr_"))}
    st["config"] = json.dumps(old)
    torch.save(st, path)
    del st["stopper"]
    torch.save(st, path)
    more = _trainer(tmp_path, steps=12, save_interval=1)
    with pytest.raises(ConfigError, match="different rdpo config"):  # steps differ
        more.try_resume()
    old["steps"] = 12
    st["config"] = json.dumps(old)
    torch.save(st, path)
    more.train()  # the stopping rule's reference starts at the first evaluation after the resume
    assert more.step == 12 and more.stopper.ref_step >= 10
    with pytest.raises(ConfigError, match="different rdpo config"):
        _trainer(tmp_path, steps=2, save_interval=1, stop_patience=2).try_resume()
