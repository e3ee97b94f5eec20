"""``fedenc child --workers N``: the child's round trained by N computing-server processes
returns exactly the parameters of the in-process round, plus the elastic counters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from flwr.app import Context, RecordDict

from fedenc.elastic.common import ElasticError
from fedenc.federation import child, records
from tests.federation.test_child import RUN_CONFIG, instruction, query, send


def context(run_id: int, workers: int) -> Context:
    node_config: dict[str, int | str] = {"partition-id": 0, "num-partitions": 2}
    if workers:
        node_config["elastic-workers"] = workers
    return Context(
        run_id=run_id, node_id=2, node_config=node_config, state=RecordDict(),
        run_config=dict(RUN_CONFIG),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    child.forget()
    for site in child._sites.values():
        site.close()
    child._sites.clear()


def test_child_round_with_two_workers_equals_the_in_process_round() -> None:
    ins, shared = instruction()
    replies = {}
    for run_id, workers in ((77, 0), (78, 2)):
        ctx = context(run_id, workers)
        assert query(ctx, ins).accepted
        content = records.round_content(records.params_to_record(shared), ins, 1)
        replies[workers] = child.handle_train(send(content, "train", ctx), ctx)
    plain = records.record_to_params(replies[0].content["arrays"], "child")
    elastic = records.record_to_params(replies[2].content["arrays"], "child")
    for name, value in plain.items():
        assert torch.equal(value, elastic[name]), name
    metrics = records.read_metrics(replies[2].content)
    assert metrics["elastic_batches"] > 0 and metrics["elastic_reassigned"] == 0
    assert (
        metrics["trained_examples"] == records.read_metrics(replies[0].content)["trained_examples"]
    )
    assert metrics["train_loss"] == pytest.approx(
        records.read_metrics(replies[0].content)["train_loss"], rel=1e-6
    )
    assert any(k.startswith("elastic_pairs_per_s/") for k in metrics)


def test_the_childs_elastic_options_reach_its_site() -> None:
    # Off loopback without certificates the site refuses to start, and the round says why.
    ins, shared = instruction()
    ctx = context(79, 1)
    ctx.node_config["elastic-listen"] = "0.0.0.0:0"
    assert query(ctx, ins).accepted
    content = records.round_content(records.params_to_record(shared), ins, 1)
    with pytest.raises(ElasticError, match="--elastic-certs DIR"):
        child.handle_train(send(content, "train", ctx), ctx)
    assert not child._sites
