"""Every registered model family keeps the ``ModelFamily`` contract (goose_jax.models.family),
checked the same way for each (parametrized over ``families.REGISTRY``): what the family says
about its parameters, sites and Hugging Face modules against its own model's init and against
the model transformers builds from the same config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goose_jax.core import sharding
from goose_jax.core.trees import flatten_sites
from goose_jax.models import families

# Each family's tiny preset, and those of its names whose architecture differs (Gemma 2).
CASES = {**{fam.names[0]: (fam, "tiny") for fam in families.REGISTRY},
         "gemma2": (families.named("gemma2"), "gemma2-tiny")}


@pytest.fixture(params=sorted(CASES))
def family(request):
    fam, preset = CASES[request.param]
    return fam, fam.preset(preset)


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_paths(v, (*prefix, k)))
        return out
    return {prefix: tree}


def test_registry_dispatches_each_config_to_its_family(family):
    fam, cfg = family
    assert families.of(cfg) is fam
    assert families.family(cfg) in fam.names and families.named(fam.name_of(cfg)) is fam
    assert isinstance(cfg, fam.config_type)


def test_init_matches_the_declared_parameter_shapes_and_axes(family):
    fam, cfg = family
    params = fam.init_params(cfg, 0)
    shapes = {p: tuple(np.shape(x)) for p, x in _paths(params).items()}
    assert shapes == {tuple(p): tuple(s) for p, s in fam.param_shapes(cfg).items()}
    fam.validate_params(cfg, params)
    axes = _paths(fam.param_logical_axes(cfg))
    assert set(axes) == set(shapes)
    for path, names in axes.items():
        assert len(tuple(names)) == len(shapes[path]), path


def test_sites_match_the_pattern_and_the_kernels(family):
    import re

    fam, cfg = family
    params = _paths(fam.init_params(cfg, 0))
    sites = fam.site_shapes(cfg)
    assert sites and all(re.fullmatch(fam.sites_pattern, s) for s in sites)
    for site, (d_in, d_out) in sites.items():
        kernel = params[(*site.split("/"), "kernel")]
        assert np.shape(kernel) == (d_in, d_out), site


def test_base_shardings_cover_every_parameter(family):
    fam, cfg = family
    mesh = sharding.make_mesh(data=-1, model=1)
    got = _paths(fam.base_shardings(cfg, mesh))
    assert set(got) == set(fam.param_shapes(cfg))


def test_peft_module_names_are_the_transformers_linears(family):
    """The PEFT table against the PyTorch model transformers builds from the same config: each
    named module is an ``nn.Linear`` of the site's (in, out)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fam, cfg = family
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    model_cls = (transformers.AutoModelForCausalLM if fam.decoder_only
                 else transformers.AutoModelForSeq2SeqLM)
    model = model_cls.from_config(hf_cfg)
    modules = dict(model.named_modules())
    shapes = fam.site_shapes(cfg)
    table = fam.peft_sites(cfg)
    assert {s.name for s in table.values()} == set(shapes)
    for name, site in table.items():
        module = modules[name]
        assert isinstance(module, torch.nn.Linear), name
        assert (module.in_features, module.out_features) == shapes[site.name] == \
            (site.d_in, site.d_out)
    for name in fam.peft_no_site:
        assert name in modules, name


class _Count:
    """A site adapter that sums, per site, the mask of the tokens the family says it reads."""

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Count)

    def __call__(self, module, x, y):
        mask = module.get_variable("capture", "mask").astype(jnp.float32)
        module.sow("intermediates", "count", jnp.sum(mask))
        return y


def test_masked_forward_reads_the_activation_batch(family):
    """A training micro-batch through ``activation_batch`` runs ``masked_forward``: every site
    counts exactly the tokens its mask marks (encoder sites the inputs, decoder sites the
    targets on a T5; the packed prompt + target on a decoder-only model)."""
    from goose_jax.data.tokenizers import ByteTokenizer

    fam, cfg = family
    tok = ByteTokenizer()
    cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.vocab_size))
    cfg = fam.with_tokenizer(cfg, tok)
    params = fam.init_params(cfg, 0)
    inputs = np.array([[5, 6, 7, 1], [8, 9, 0, 0]], np.int32)
    targets = np.array([[10, 1, 0], [11, 12, 1]], np.int32)
    batch = {"inputs": inputs, "input_mask": (inputs != 0).astype(np.int32), "targets": targets}
    arrays = fam.activation_batch(cfg, batch, tok)
    sites = tuple(fam.site_shapes(cfg))
    forward, names = fam.masked_forward(cfg, _Count(), sites, "capture")
    assert len(arrays) == len(names)
    _, state = jax.jit(forward)({"params": params}, *(jnp.asarray(a) for a in arrays))
    counts = {s: float(v["count"][0]) for s, v in flatten_sites(state["intermediates"]).items()}
    assert set(counts) == set(sites)
    if fam.decoder_only:   # one sequence: every prompt and target token, no padding
        want = {s: float(np.sum(batch["input_mask"]) + np.sum(targets != 0)) for s in sites}
    else:                  # encoder sites and cross k / v read the inputs; the rest the targets
        enc, dec = float(np.sum(batch["input_mask"])), float(np.sum(targets != 0))
        want = {s: enc if s.startswith("encoder/") or s.endswith(("cross_attn/k", "cross_attn/v"))
                else dec for s in sites}
    assert counts == want


def test_config_record_round_trips(family):
    fam, cfg = family
    name = fam.name_of(cfg)
    back = families.config_from_record(families.config_record(cfg), name, source="x")
    assert families.config_record(back) == families.config_record(cfg)
