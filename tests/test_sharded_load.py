"""Loading straight into the layout: the expert library over the ``expert`` mesh axis and the
base model by the rules table, each process reading only what its own devices hold.

References: the written arrays themselves (cast with NumPy) and the one-host loads; the files read
are counted by wrapping the readers. With one process every device is local, so a second
"process" is simulated by building the arrays for a subset of the devices only.
"""

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import needs_8_devices
from jax.sharding import NamedSharding, PartitionSpec

import goose_jax as gj
from goose_jax.core import sharding
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.experts.lora import LoRAConfig, select_sites
from goose_jax.library.store import ExpertLibrary
from goose_jax.models import base as base_model
from goose_jax.models import checkpoint
from goose_jax.models.t5.hf import base_shardings, load_hf_t5, save_hf_t5
from goose_jax.models.t5.model import init_params

pytestmark = needs_8_devices

CFG = gj.T5Config.preset("tiny")
LORA = LoRAConfig(rank=4, sites=r".*/(self_attn/[qv]|ffn/wo)")
E = 5  # odd: no expert axis of 2, 4 or 8 divides it


def _flat(tree) -> dict[str, jax.Array]:
    return {f"{site}/{k}": v for site, leaves in flatten_sites(tree).items()
            for k, v in leaves.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A library of E experts with gates, and the arrays written into it (site/leaf -> (E, ...))."""
    base = jax.tree.map(np.asarray, init_params(CFG, 0))
    lib = ExpertLibrary.create(tmp_path_factory.mktemp("sl") / "lib", CFG, base, LORA)
    rng = np.random.default_rng(0)
    sites = select_sites(CFG, LORA)
    experts = nest_sites({s: {"lora_a": rng.normal(size=(E, i, 4)).astype(np.float32),
                              "lora_b": rng.normal(size=(E, 4, o)).astype(np.float32)}
                          for s, (i, o) in sites.items()})
    gates = nest_sites({s: {"gate": rng.normal(size=(E, i)).astype(np.float32)}
                        for s, (i, _) in sites.items()})
    for e in range(E):
        lib.add(f"x{e}", experts, gates, index=e)
    return lib, {**_flat(experts), **_flat(gates)}


@pytest.fixture
def reads(monkeypatch):
    """The names of the experts whose files are read, in order."""
    seen = []
    real = ExpertLibrary._read

    def counting(self, entry, *args):
        seen.append(entry["name"])
        return real(self, entry, *args)

    monkeypatch.setattr(ExpertLibrary, "_read", counting)
    return seen


def test_padding_helpers():
    assert [sharding.padded_count(n, 4) for n in (0, 1, 4, 5, 8, 166)] == [0, 4, 4, 8, 8, 168]
    assert sharding.padded_count(166, 1) == 166
    mesh = sharding.make_mesh(data=2, expert=4)
    assert sharding.expert_shards(mesh) == 4
    assert sharding.expert_sharding(mesh) == NamedSharding(mesh, PartitionSpec("expert"))
    # Rows of an (8, 3) array each device holds: mesh position (d, 0, x) holds rows 2x, 2x + 1.
    spec = sharding.expert_sharding(mesh)
    for d in range(2):
        for x in range(4):
            assert sharding.local_rows(spec, (8, 3), [mesh.devices[d, 0, x]]) == [2 * x, 2 * x + 1]
    assert sharding.local_rows(spec, (8, 3), mesh.devices[:, 0, 1:3].ravel()) == [2, 3, 4, 5]
    assert sharding.local_rows(spec, (8, 3)) == list(range(8))  # every device is ours here


@pytest.mark.parametrize("axes", [dict(data=2, expert=4), dict(expert=8), dict(data=8)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_sharded_load_equals_the_host_load(world, reads, axes, dtype):
    lib, written = world
    mesh = sharding.make_mesh(**axes)
    X = mesh.shape["expert"]
    E_pad = -(-E // X) * X
    experts, gates = lib.load(dtype=dtype, mesh=mesh)
    assert sorted(reads) == lib.names  # every file once, though each row sits on 8 / X devices
    host_e, host_g = lib.load(dtype=dtype)
    got, host = {**_flat(experts), **_flat(gates)}, {**_flat(host_e), **_flat(host_g)}
    assert got.keys() == host.keys() == written.keys()
    for key, x in got.items():
        assert x.shape == (E_pad, *written[key].shape[1:]) and x.dtype == dtype, key
        assert x.sharding == NamedSharding(mesh, PartitionSpec("expert")), key
        value = np.asarray(x)
        want = written[key].astype(dtype)
        assert np.array_equal(value[:E].view(np.uint8), want.view(np.uint8)), key
        assert np.array_equal(value[:E], np.asarray(host[key])), key
        assert not value[E:].any(), key  # inert experts: all zero
        for shard in x.addressable_shards:  # each device holds its E_pad / X experts
            assert shard.data.shape[0] == E_pad // X, key
            rows = range(*shard.index[0].indices(E_pad))
            np.testing.assert_array_equal(np.asarray(shard.data), value[rows.start:rows.stop])


def test_a_process_reads_only_its_own_experts_files(world, reads, monkeypatch):
    """Builds the arrays only for the devices of one simulated process (the rest come out zero),
    as ``make_array_from_callback`` does in a real multi-process run, and counts the files read."""
    lib, written = world
    mesh = sharding.make_mesh(data=2, expert=4)  # E_pad 8: two experts per expert shard
    real = jax.make_array_from_callback
    for columns, want in (((0, 1), ["x0", "x1", "x2", "x3"]), ((2,), ["x4"]), ((3,), [])):
        ours = mesh.devices[:, 0, list(columns)].ravel()

        def only_ours(shape, spec, callback, ours=ours):
            mine = [spec.devices_indices_map(shape)[d] for d in ours]
            return real(shape, spec, lambda index: callback(index) if index in mine
                        else np.zeros([len(range(*s.indices(n))) for s, n in zip(index, shape)],
                                      np.float32))

        monkeypatch.setattr(jax, "make_array_from_callback", only_ours)
        reads.clear()
        experts, _ = lib.load(names=lib.names, mesh=mesh)
        assert sorted(set(reads)) == want and len(reads) == len(want), columns
        rows = sharding.local_rows(sharding.expert_sharding(mesh), (8,), ours)
        value = np.asarray(_flat(experts)["encoder/block_0/ffn/wo/lora_b"])
        real_rows = [r for r in rows if r < E]
        np.testing.assert_array_equal(value[real_rows],
                                      written["encoder/block_0/ffn/wo/lora_b"][real_rows])
    monkeypatch.undo()


def test_a_subset_and_no_gates_read_only_those_files(world, reads):
    lib, _ = world
    mesh = sharding.make_mesh(data=2, expert=4)
    experts, gates = lib.load(["x3", "x1"], gates=False, mesh=mesh)
    assert sorted(reads) == ["x1", "x3"] and gates is None
    assert next(iter(_flat(experts).values())).shape[0] == 4


# --- the base model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    params = init_params(CFG, 3)
    save_hf_t5(CFG, params, root / "hf")
    checkpoint.save_model(root / "ckpt", CFG, params)
    return root, jax.tree.map(np.asarray, params)


def _assert_laid_out(params, want, mesh, dtype):
    shardings = base_shardings(CFG, mesh)
    flat, ref = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want)
    split = 0
    for (path, x), w, s in zip(flat, ref, jax.tree.leaves(shardings)):
        assert x.dtype == dtype and x.sharding == s, path
        assert np.array_equal(np.asarray(x), w.astype(dtype)), path
        split += x.addressable_shards[0].data.shape != x.shape
    assert split > 10  # the model-parallel kernels really are split


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_base_reads_each_tensor_once_into_its_layout(base_dirs, monkeypatch, dtype):
    from goose_jax.core.tensorfile import SafetensorsFile

    root, params = base_dirs
    mesh = sharding.make_mesh(data=2, model=4)
    seen = []
    real = SafetensorsFile.__getitem__
    monkeypatch.setattr(SafetensorsFile, "__getitem__",
                        lambda self, key: seen.append(key) or real(self, key))
    cfg, loaded = base_model.load_base(str(root / "hf"), dtype=dtype, mesh=mesh)
    # each tensor once (the tie check reads the two heads once more), not once per device
    assert len(seen) == len(set(seen)) + 2 and len(set(seen)) == len(jax.tree.leaves(params))
    _assert_laid_out(loaded, params, mesh, np.dtype(dtype) if dtype == "float32"
                     else ml_dtypes.bfloat16)
    assert cfg == load_hf_t5(root / "hf")[0].replace(dtype=cfg.dtype)


def test_checkpoint_and_random_bases_restore_into_their_layout(base_dirs):
    root, params = base_dirs
    mesh = sharding.make_mesh(data=2, model=4)
    _, loaded = base_model.load_base(str(root / "ckpt"), mesh=mesh)
    _assert_laid_out(loaded, params, mesh, np.float32)
    _, drawn = base_model.load_base("random:tiny", seed=3, mesh=mesh)
    _assert_laid_out(drawn, params, mesh, np.float32)


def test_a_corrupt_file_fails_the_sharded_load_in_one_line(world, tmp_path):
    import shutil

    from goose_jax.core.errors import LibraryError

    lib, _ = world
    copy = shutil.copytree(lib.path, tmp_path / "lib")
    file = copy / "experts" / "x3.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(copy).load(mesh=sharding.make_mesh(data=2, expert=4))
    assert "\n" not in str(e.value) and "x3.safetensors" in str(e.value) and "sha256" in str(
        e.value)
