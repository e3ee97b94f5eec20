"""ChildDataConfig: the one check of a child's data settings (the child CLI and simulate's
scenario both go through it), and its messages start with the setting's key."""

from __future__ import annotations

import pytest

from fedenc.federation.child_data import ChildDataConfig


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"partition": "random"}, "partition must be one of iid, time, dirichlet, got 'random'"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
        ({"alpha": float("inf")}, "alpha must be a finite number > 0, got inf"),
        ({"valid-fraction": 1.0}, "valid-fraction must lie in [0, 1), got 1.0"),
        ({"valid-fraction": -0.1}, "valid-fraction must lie in [0, 1), got -0.1"),
        ({"synthetic-sessions": 2}, "synthetic-sessions must be >= 3"),
        ({"synthetic-items": 10}, "synthetic-items must be >= 40 (2 per item cluster), got 10"),
        ({"partition-id": 3, "num-partitions": 3}, "partition-id 3 outside 0..2"),
    ],
)
def test_bad_settings_are_named_by_their_key(node: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        ChildDataConfig.from_configs({}, node)
    assert str(err.value).startswith(message)


def test_a_childs_own_settings_win_over_the_runs_and_defaults_are_valid() -> None:
    run = {"partition": "dirichlet", "alpha": 0.3, "seed": 7, "synthetic-items": 500}
    cfg = ChildDataConfig.from_configs(run, {"alpha": 2.0, "partition-id": 1, "num-partitions": 2})
    assert (cfg.scheme, cfg.alpha, cfg.seed, cfg.synthetic_items) == ("dirichlet", 2.0, 7, 500)
    assert ChildDataConfig.from_configs({}, {}) == ChildDataConfig()
    # A bad run-config value is caught even when the child's own settings are fine.
    with pytest.raises(ValueError, match=r"^alpha must be"):
        ChildDataConfig.from_configs({"alpha": -1.0}, {"partition": "iid"})


def test_a_value_of_the_wrong_type_names_the_config_it_came_from() -> None:
    with pytest.raises(ValueError, match=r"^node config 'alpha' must be a number, got 'x'"):
        ChildDataConfig.from_configs({"alpha": 0.5}, {"alpha": "x"})
    with pytest.raises(ValueError, match=r"^run config 'alpha' must be a number, got 'x'"):
        ChildDataConfig.from_configs({"alpha": "x"}, {})
    with pytest.raises(ValueError, match=r"^node config 'partition-id' must be an integer"):
        ChildDataConfig.from_configs({}, {"partition-id": "first"})


def test_a_job_spec_sets_one_spelling_of_a_key_the_master_reads() -> None:
    # An underscore spelling stored as such was shadowed by the master's default under the
    # hyphen spelling: the job trained with the default and said nothing.
    from google.protobuf.struct_pb2 import Struct

    from fedenc.control.spec import spec_to_run_config
    from fedenc.federation.runconfig import get_int
    from fedenc.proto.fedenc.v1 import control_pb2 as cpb

    values = Struct()
    values.update({"local_epochs": 7})
    rc = spec_to_run_config(cpb.JobSpec(run_config=values), {"local-epochs": 1})
    assert get_int(rc, "local-epochs", 0) == 7 and "local_epochs" not in rc
