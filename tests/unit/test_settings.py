"""Settings are the one list: the command line and the workers' command lines are derived from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.__main__ import _parser
from server.settings import Settings, given_arguments, worker_arguments


def parse(*argv: str) -> Settings:
    return Settings(**given_arguments(_parser().parse_args(["serve", *argv])))


def test_every_setting_has_a_flag() -> None:
    text = _parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name in Settings.model_fields:
        if name in ("worker_index", "peer_dir"):
            assert f"--{name.replace('_', '-')}" not in text  # internal: hidden from --help
        else:
            assert f"--{name.replace('_', '-')}" in text


def test_flags_left_out_keep_the_defaults() -> None:
    assert parse() == Settings()


def test_flags_are_typed_from_the_fields() -> None:
    settings = parse(
        "--port", "9001", "--allow-http", "false", "--log-format", "json", "--load-model", "a", "--load-model", "b",
        "--shutdown-grace-s", "2.5", "--http-max-body-bytes", "5000000", "--model-repository", "repo",
    )
    assert settings.port == 9001 and settings.allow_http is False and settings.log_format == "json"
    assert settings.load_model == ["a", "b"] and settings.shutdown_grace_s == 2.5
    assert settings.http_max_body_bytes == 5000000 and settings.model_repository == Path("repo")


@pytest.mark.parametrize("argv", [["--allow-metrics", "yes"], ["--log-format", "xml"], ["--port", "x"]])
def test_bad_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)


def test_a_worker_gets_every_setting_of_the_server() -> None:
    settings = parse(
        "--allow-metrics", "false", "--log-requests", "true", "--max-send-message-bytes", "8388608",
        "--load-model", "*", "--model-control-mode", "explicit", "--workers", "3", "--strict-readiness", "false",
    )
    argv = worker_arguments(settings, port=1234, http_port=0, metrics_port=5678, worker_index=1, peer_dir=Path("/p"))
    worker = parse(*argv)
    assert worker.port == 1234 and worker.metrics_port == 5678 and worker.worker_index == 1
    assert worker.peer_dir == Path("/p") and worker.port_file is None
    own = ("port", "http_port", "metrics_port", "port_file", "worker_index", "peer_dir", "http_max_body_bytes",
           "model_name")
    same = {n for n in Settings.model_fields if n not in own}
    assert {n: getattr(worker, n) for n in same} == {n: getattr(settings, n) for n in same}
    assert worker.http_max_body_bytes == settings.resolved_http_max_body_bytes()
