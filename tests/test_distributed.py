"""Data-parallel training and shards: two gloo processes train as one does; shards merge into the one-pass store."""
import json
import os
import socket

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

from tests.fixtures import make_dataset
from tests.tiny import tiny_cam_net
from wsss_core.cams.infer import export_cams
from wsss_core.cams.store import CamStoreWriter, merge_stores
from wsss_core.config import CamsParams, TrainRecipe
from wsss_core.data.label_dir import LabelDirWriter, merge_label_dirs
from wsss_core.distributed import (RankSlices, data_parallel, global_batches, is_main, parse_shard, process_group,
                                   shard_of)
from wsss_core.errors import DataError, ParamsError
from wsss_core.io import shard_path
from wsss_core.methods.cam import CamMethod
from wsss_core.models.groups import ParamGroup
from wsss_core.training import EpochSeededSet, StepLoss, fit

RECIPE = TrainRecipe(epochs=3, batch_size=8, lr=0.05, weight_decay=1e-3)


class BlobSet(EpochSeededSet):
    """20 noisy [3, 6, 6] images, class = index % 3; augmentation noise seeded per (epoch, index)."""

    def __init__(self):
        super().__init__([str(i) for i in range(20)], seed=0)

    def __getitem__(self, index):
        rng = self.sample_rng(index)
        image = np.random.default_rng(index).normal(size=(3, 6, 6)) + 0.1 * rng.normal(size=(3, 6, 6))
        image[index % 3] += 1.0
        return torch.from_numpy(image.astype(np.float32)), torch.tensor(index % 3)


def blob_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def cross_entropy(model):
    def loss(batch):
        images, targets = batch
        value = nn.functional.cross_entropy(model(images), targets)
        return value, {"twice": 2 * value.item()}
    return loss


def train_blobs(out_dir, rank: int) -> None:
    """Train blob_model with fit; save its weights and (rank 0's) epoch means under out_dir."""
    model, reported = blob_model(), []
    fit(model, BlobSet(), cross_entropy(model), recipe=RECIPE, device=torch.device("cpu"), seed=3, desc="blobs",
        groups=[ParamGroup("new", list(model.parameters()))], on_epoch_end=lambda epoch, means: reported.append(means))
    torch.save(model.state_dict(), out_dir / f"weights{rank}.pt")
    if reported:
        (out_dir / f"means{rank}.json").write_text(json.dumps(reported))


def one_step_gradients(model, images, targets) -> dict[str, torch.Tensor]:
    step = data_parallel(StepLoss(model, cross_entropy(model)), torch.device("cpu"))
    step((images, targets))[0].backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def worker(rank: int, world_size: int, port: int, out_dir) -> None:
    """One rank of a gloo world, set up as torchrun sets its workers up (environment variables)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group(torch.device("cpu"), "gloo"):
        assert is_main() == (rank == 0)
        images, targets = next(iter(DataLoader(BlobSet(), batch_size=8)))
        share = slice(rank * 4, (rank + 1) * 4)
        gradients = one_step_gradients(blob_model(), images[share], targets[share])
        torch.save(gradients, out_dir / f"gradients{rank}.pt")
        train_blobs(out_dir, rank)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
    return out_dir


@pytest.mark.e2e
def test_ddp_gradients_are_the_one_process_gradients(two_process_run):
    images, targets = next(iter(DataLoader(BlobSet(), batch_size=8)))
    expected = one_step_gradients(blob_model(), images, targets)
    for rank in (0, 1):
        got = torch.load(two_process_run / f"gradients{rank}.pt", weights_only=True)
        for name, gradient in expected.items():
            torch.testing.assert_close(got[name], gradient, rtol=1e-5, atol=1e-6)
    assert max(gradient.abs().max() for gradient in expected.values()) > 1e-3  # a test that could fail


@pytest.mark.e2e
def test_two_processes_train_as_one_with_the_global_batch(tmp_path, two_process_run):
    train_blobs(tmp_path, 0)
    one = torch.load(tmp_path / "weights0.pt", weights_only=True)
    start = blob_model().state_dict()
    for rank in (0, 1):
        two = torch.load(two_process_run / f"weights{rank}.pt", weights_only=True)
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(one[name], start[name])  # it trained
    one_means = json.loads((tmp_path / "means0.json").read_text())
    two_means = json.loads((two_process_run / "means0.json").read_text())
    assert len(two_means) == RECIPE.epochs
    for single, double in zip(one_means, two_means):
        assert double["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert double["twice"] == pytest.approx(single["twice"], rel=1e-5)
    assert not (two_process_run / "means1.json").exists()  # only rank 0 reports


def test_rank_slices_of_each_global_batch_are_the_one_process_batches():
    data = list(range(19))
    plain = DataLoader(data, batch_size=6, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(5))
    expected = [[batch.tolist() for batch in plain] for _ in range(3)]  # three epochs

    def epochs(rank, size):
        generator = torch.Generator().manual_seed(5)
        loader = DataLoader(data, batch_sampler=RankSlices(global_batches(len(data), 6, generator), rank, size),
                            generator=generator)
        return [[batch.tolist() for batch in loader] for _ in range(3)]

    assert epochs(0, 1) == expected
    halves = [epochs(0, 2), epochs(1, 2)]
    assert [[a + b for a, b in zip(*pair)] for pair in zip(*halves)] == expected
    assert len(expected[0]) == 3 and expected[0] != expected[1]


def test_shards_and_their_parsing():
    assert shard_of(list("abcde"), 1, 2) == ["b", "d"]
    assert sorted(shard_of(list("abcde"), 0, 2) + shard_of(list("abcde"), 1, 2)) == list("abcde")
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ParamsError, match="--shard"):
            parse_shard(bad)


def store_contents(path) -> dict:
    """Every dataset's values and every attribute of a store, by HDF5 path."""
    contents = {}
    with h5py.File(path, "r") as handle:
        contents["/"] = dict(handle.attrs)
        handle.visititems(lambda name, item: contents.__setitem__(name, (
            item[()].tobytes() if isinstance(item, h5py.Dataset) else None,
            {key: np.asarray(value).tolist() for key, value in item.attrs.items()})))
    return contents


def test_sharded_export_merges_into_the_one_pass_store(tmp_path):
    dataset = make_dataset(tmp_path, sizes=((20, 28), (20, 28), (17, 23)))
    model = tiny_cam_net(3)

    def run(path, shard):
        return export_cams(CamMethod().cam_hooks(model), dataset, dataset.ids("train"), path,
                           {"method": "toy", "scales": [1.0, 0.5]}, CamsParams(scales=[1.0, 0.5], batch_size=1),
                           device=torch.device("cpu"), shard=shard)

    single = tmp_path / "cams.h5"
    run(single, (0, 1))
    for index in range(2):
        run(shard_path(single.with_name("merged.h5"), index, 2), (index, 2))
    parts = [shard_path(tmp_path / "merged.h5", index, 2) for index in range(2)]
    assert [len(h5py.File(part, "r")) for part in parts] == [2, 1]
    merge_stores(parts, tmp_path / "merged.h5", dataset.ids("train"))
    assert store_contents(tmp_path / "merged.h5") == store_contents(single)


def test_merge_refuses_missing_duplicate_and_foreign_images(tmp_path):
    def part(name, ids):
        with CamStoreWriter(tmp_path / name, {"method": "toy"}) as writer:
            for image_id in ids:
                writer.write(image_id, np.ones((1, 2, 2)), np.array([1]))
        return tmp_path / name

    a, b, c = part("a.h5", ["x"]), part("b.h5", ["y"]), part("c.h5", ["x", "z"])
    merge_stores([a, b], tmp_path / "ok.h5", ["x", "y"])
    assert sorted(h5py.File(tmp_path / "ok.h5", "r")) == ["x", "y"]
    with pytest.raises(DataError, match="also in"):
        merge_stores([a, c], tmp_path / "bad.h5", ["x", "z"])
    with pytest.raises(DataError, match="miss 1 and add 0"):
        merge_stores([a], tmp_path / "bad.h5", ["x", "y"])
    with pytest.raises(DataError, match="miss 0 and add 1"):
        merge_stores([a, b], tmp_path / "bad.h5", ["x"])
    with pytest.raises(DataError, match="not found"):
        merge_stores([a, tmp_path / "none.h5"], tmp_path / "bad.h5", ["x"])
    assert not (tmp_path / "bad.h5").exists()


def test_a_global_batch_the_processes_do_not_divide_is_refused(tmp_path, monkeypatch):
    from wsss_core import distributed
    monkeypatch.setattr(distributed, "world", lambda: (0, 3))
    model = blob_model()
    with pytest.raises(ParamsError, match="batch_size 8 is the global batch and must be a multiple of the 3"):
        fit(model, BlobSet(), cross_entropy(model), recipe=RECIPE, device=torch.device("cpu"), seed=0, desc="x",
            groups=[ParamGroup("new", list(model.parameters()))])


def test_label_folder_shards_merge_into_the_one_pass_folder_and_scores(tmp_path):
    dataset = make_dataset(tmp_path)
    ids = dataset.ids("train")
    maps = {image_id: (dataset.read_mask(image_id) + index) % 3 for index, image_id in enumerate(ids)}
    with LabelDirWriter(tmp_path / "one", dataset) as one:
        for image_id in ids:
            one.write(image_id, maps[image_id])
    parts = [tmp_path / f"part{index}" for index in range(2)]
    for index, part in enumerate(parts):
        with LabelDirWriter(part, dataset) as writer:
            for image_id in shard_of(ids, index, 2):
                writer.write(image_id, maps[image_id])
    with LabelDirWriter(tmp_path / "merged", dataset) as merged:
        merge_label_dirs(parts, merged, ids)
    assert merged.report() == one.report() and one.report()["scored_images"] == len(ids)
    for image_id in ids:
        assert (tmp_path / "merged" / f"{image_id}.png").read_bytes() == (tmp_path / "one" / f"{image_id}.png").read_bytes()
    with pytest.raises(DataError, match="miss 1 and add 0"):
        with LabelDirWriter(tmp_path / "bad", dataset) as writer:
            merge_label_dirs(parts, writer, ids + ["extra"])
    with pytest.raises(DataError, match="is also in"):
        with LabelDirWriter(tmp_path / "bad", dataset) as writer:
            merge_label_dirs([*parts, tmp_path / "one"], writer, ids)
    with pytest.raises(DataError, match="shard folder not found"):
        with LabelDirWriter(tmp_path / "bad", dataset) as writer:
            merge_label_dirs([tmp_path / "nowhere"], writer, ids)
    assert not (tmp_path / "bad").exists()


def test_a_merge_refuses_shards_of_other_params_or_inputs_and_unfinished_ones(tmp_path, monkeypatch):
    from stages._run import check_shards, shard_fingerprint, shard_marker
    from wsss_core.config import Params
    from wsss_core.errors import DataError
    from wsss_core.io import write_json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/dataset.json").write_text("{}")
    (tmp_path / "models").mkdir()
    (tmp_path / "models/cls.pt").write_bytes(b"weights of run 1")
    params, module = Params(), "stages.export_cams"
    for index in range(2):
        write_json(shard_marker(module, index, 2), {"fingerprint": shard_fingerprint(module, params)})
    assert shard_marker(module, 1, 2) == tmp_path.joinpath("cams/cams.h5.shard-1-of-2.done").relative_to(tmp_path)
    assert check_shards(module, params, 2) == [shard_marker(module, 0, 2), shard_marker(module, 1, 2)]
    other = params.model_copy(update={"cams": params.cams.model_copy(update={"flip": False})})
    with pytest.raises(DataError, match=r"cams.h5.shard-0-of-2.done: shard 0 of 2 was made with other params"):
        check_shards(module, other, 2)
    (tmp_path / "models/cls.pt").write_bytes(b"weights of run 2")  # retrained between the shards and the merge
    with pytest.raises(DataError, match="was made with other params or inputs"):
        check_shards(module, params, 2)
    (tmp_path / "models/cls.pt").write_bytes(b"weights of run 1")
    shard_marker(module, 1, 2).unlink()  # shard 1 was killed before it finished
    with pytest.raises(DataError, match=r"shard-1-of-2.done: shard 1 of 2 is missing or did not finish"):
        check_shards(module, params, 2)


def test_a_truncated_shard_store_is_one_line(tmp_path):
    from wsss_core.errors import DataError

    part = tmp_path / "a.h5"
    with CamStoreWriter(part, {"method": "cam"}) as writer:
        writer.write("x", np.ones((1, 2, 2)), np.array([1]))
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(DataError, match=r"a.h5: unreadable shard store, truncated or not HDF5"):
        merge_stores([part], tmp_path / "merged.h5", ["x"])
    assert not (tmp_path / "merged.h5").exists()
