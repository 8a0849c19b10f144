"""MPS parity: our registry scorer vs a transcription of the MPS repository's scoring code.

MPS (Kwai-Kolors/MPS) is not on PyPI and cannot be installed here (its code lives only in the GitHub repository
and its checkpoint is a pickled whole model), so the reference is a line-by-line transcription of
``eval_overall_mps_on_hpdv2.infer_one_sample`` (XCLIPModel token-level features, condition mask with threshold
0.3, ``cross_model(image_f, text_f, mask)[:, 0]``, ``logit_scale.exp() * text @ image.T``), with the
``Cross_model`` forward written out functionally over the state-dict tensors under the original key names.
Both run on the same tiny random weights saved to a local file, one image at a time for the reference.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from _tiny_tokenizers import build_clip_processor  # noqa: E402

from epd.errors import EPDError  # noqa: E402
from epd.rewards import get_scorer  # noqa: E402
from epd.rewards.mps import OVERALL_CONDITION  # noqa: E402

DIM, LAYERS, HEADS, DIM_HEAD, FF_MULT = 32, 2, 2, 8, 2
PROMPTS = ["a photo of an astronaut riding a horse, detailed light and color",
           "a red car on a street at night", "portrait of a woman with long hair, hands visible"]


def tiny_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=DIM,
    )


def original_cross_keys():
    """Parameter names and shapes of MPS ``Cross_model(dim, layer_num, dim_head, heads, ff_mult)``."""
    keys = {}
    inner, ff = HEADS * DIM_HEAD, DIM * FF_MULT
    for i in range(LAYERS):
        c, s = f"cross_model.layers.{i}.0.fn.", f"cross_model.layers.{i}.1.fn."
        keys.update({c + "norm.weight": (DIM,), c + "norm.bias": (DIM,), c + "to_q.weight": (inner, DIM),
                     c + "to_kv.weight": (2 * DIM_HEAD, DIM), c + "to_out.weight": (DIM, inner),
                     c + "ff.0.weight": (2 * ff, DIM), c + "ff.2.weight": (DIM, ff),
                     s + "norm.weight": (DIM,), s + "norm.bias": (DIM,), s + "rotary_emb.inv_freq": (DIM_HEAD // 2,),
                     s + "fused_attn_ff_proj.weight": (inner + 2 * DIM_HEAD + 2 * ff, DIM),
                     s + "attn_out.weight": (DIM, inner), s + "ff_out.1.weight": (DIM, ff)})
    return keys


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import CLIPModel

    root = tmp_path_factory.mktemp("mps")
    wdir = root / "weights"
    (wdir / "mps").mkdir(parents=True)
    torch.manual_seed(0)
    clip = CLIPModel(tiny_config())
    sd = {"model." + k: v for k, v in clip.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for k, shape in original_cross_keys().items():
        if k.endswith("norm.bias"):
            sd[k] = torch.zeros(shape)
        elif k.endswith("norm.weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("inv_freq"):
            sd[k] = 1.0 / (10000 ** (torch.arange(0, DIM_HEAD, 2).float() / DIM_HEAD))
        else:
            sd[k] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    torch.save(sd, wdir / "mps" / "MPS_overall_state_dict.pt")
    proc = build_clip_processor(wdir / "mps" / "processor", 224)
    (proc / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    rng = np.random.default_rng(4)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(256, 256), (300, 240), (224, 224)]]
    return wdir, sd, imgs


# ---- transcription of the MPS reference (functional Cross_model over the original state-dict keys) ----

def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"])


def _swiglu(x):
    x, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * x


def _rotate_half(x):
    x1, x2 = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2).unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


def ref_cross_attention(sd, p, x, context, mask):
    x = _ln(x, sd, p)
    q = x @ sd[p + "to_q.weight"].T
    b, n, _ = q.shape
    q = q.reshape(b, n, HEADS, -1).permute(0, 2, 1, 3) * DIM_HEAD ** -0.5
    k, v = (context @ sd[p + "to_kv.weight"].T).chunk(2, dim=-1)
    sim = torch.einsum("b h i d, b j d -> b h i j", q, k)
    sim = sim + mask.unsqueeze(1).repeat(1, HEADS, 1, 1)
    sim = sim - sim.amax(dim=-1, keepdim=True)
    out = torch.einsum("b h i j, b j d -> b h i d", sim.softmax(dim=-1), v)
    out = out.permute(0, 2, 1, 3).reshape(b, n, -1) @ sd[p + "to_out.weight"].T
    return out + _swiglu(x @ sd[p + "ff.0.weight"].T) @ sd[p + "ff.2.weight"].T


def ref_parallel_block(sd, p, x):
    n = x.shape[1]
    x = _ln(x, sd, p)
    dims = (HEADS * DIM_HEAD, DIM_HEAD, DIM_HEAD, DIM * FF_MULT * 2)
    q, k, v, ff = (x @ sd[p + "fused_attn_ff_proj.weight"].T).split(dims, dim=-1)
    b = q.shape[0]
    q = q.reshape(b, n, HEADS, DIM_HEAD).permute(0, 2, 1, 3)
    freqs = torch.einsum("i , j -> i j", torch.arange(n).float(), sd[p + "rotary_emb.inv_freq"])
    pos = torch.cat((freqs, freqs), dim=-1)
    q, k = [t * pos.cos() + _rotate_half(t) * pos.sin() for t in (q, k)]
    sim = torch.einsum("b h i d, b j d -> b h i j", q * DIM_HEAD ** -0.5, k)
    sim = sim - sim.amax(dim=-1, keepdim=True)
    out = torch.einsum("b h i j, b j d -> b h i d", sim.softmax(dim=-1), v).permute(0, 2, 1, 3).reshape(b, n, -1)
    return out @ sd[p + "attn_out.weight"].T + _swiglu(ff) @ sd[p + "ff_out.1.weight"].T


def ref_cross_model(sd, query_tokens, context_tokens, mask):
    for i in range(LAYERS):
        query_tokens = ref_cross_attention(sd, f"cross_model.layers.{i}.0.fn.", query_tokens, context_tokens, mask) + query_tokens
        query_tokens = ref_parallel_block(sd, f"cross_model.layers.{i}.1.fn.", query_tokens) + query_tokens
    return query_tokens


def ref_infer_one_sample(image, prompt, sd, proc_dir, condition=None):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    clip_processor = CLIPImageProcessor.from_pretrained(proc_dir)
    tokenizer = AutoTokenizer.from_pretrained(proc_dir)
    hf = CLIPModel(tiny_config())
    hf.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")}, strict=False)
    hf.eval()

    def get_text_features(ids):  # XCLIPModel.get_text_features
        out = hf.text_model(input_ids=ids)
        return hf.text_projection(out[0]), hf.text_projection(out[1])

    def _tokenize(caption):
        return tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    image_input = clip_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    text_input = _tokenize(prompt)
    if condition is None:
        condition = OVERALL_CONDITION
    condition_batch = _tokenize(condition).repeat(text_input.shape[0], 1)
    with torch.no_grad():
        text_f, text_features = get_text_features(text_input)
        image_f = hf.visual_projection(hf.vision_model(pixel_values=image_input)[0])
        condition_f, _ = get_text_features(condition_batch)
        sim_text_condition = torch.einsum("b i d, b j d -> b j i", text_f, condition_f)
        sim_text_condition = torch.max(sim_text_condition, dim=1, keepdim=True)[0]
        sim_text_condition = sim_text_condition / sim_text_condition.max()
        mask = torch.where(sim_text_condition > 0.3, 0, float("-inf"))
        mask = mask.repeat(1, image_f.shape[1], 1)
        image_features = ref_cross_model(sd, image_f, text_f, mask)[:, 0, :]
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        image_score = hf.logit_scale.exp() * text_features @ image_features.T
    return image_score[0].item(), mask[0, 0]


def test_mps_matches_transcription(setup):
    wdir, sd, imgs = setup
    proc = str(wdir / "mps" / "processor")
    refs = [ref_infer_one_sample(im, p, sd, proc) for im, p in zip(imgs, PROMPTS)]
    ref = np.array([r[0] for r in refs])
    # the condition mask is exercised: some prompt tokens kept, some dropped
    assert any(torch.isinf(m).any() and (m == 0).any() for _, m in refs)
    scorer = get_scorer("mps", weights_dir=wdir, batch_size=3)  # batched: must equal per-image reference
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in imgs]
    ours = scorer(tensors, PROMPTS).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert np.ptp(ours) > 1e-3


def test_mps_rejects_wrong_file(setup, tmp_path):
    wdir, sd, _ = setup
    (tmp_path / "mps").mkdir()
    bad = {k: v for k, v in sd.items() if not k.endswith("to_out.weight")}
    torch.save(bad, tmp_path / "mps" / "MPS_overall_state_dict.pt")
    paths = {"mps_processor": str(wdir / "mps" / "processor")}
    with pytest.raises(EPDError, match="does not hold a MPS .* missing keys"):
        get_scorer("mps", weights_dir=tmp_path, paths=paths)
    torch.save({k[6:]: v for k, v in sd.items() if k.startswith("model.")}, tmp_path / "mps" / "MPS_overall_state_dict.pt")
    with pytest.raises(EPDError, match="not an MPS checkpoint"):  # a plain CLIP state dict
        get_scorer("mps", weights_dir=tmp_path, paths=paths)
