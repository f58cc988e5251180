"""SpecExtend's metrics between processes: worker files summed by the front
end's Prometheus collector (no vLLM)."""

from prometheus_client import CollectorRegistry, generate_latest

from vllm_specextend.metrics import (
    METRICS_DIR_ENV,
    METRICS,
    PICKS_KEY,
    MetricsCollector,
    MetricsFile,
)


def worker_state(scale: int) -> dict:
    """Every metric's key at `scale` times its place in METRICS (from 1)."""
    state = {key: scale * place for place, (key, *_) in enumerate(METRICS, 1)}
    state[PICKS_KEY] = [scale * 5, scale, 0, 0, scale * 2]
    return state


def place_of(key: str) -> int:
    return [key for key, *_ in METRICS].index(key) + 1


def exposition(folder) -> str:
    registry = CollectorRegistry()
    registry.register(MetricsCollector(folder))
    return generate_latest(registry).decode()


def test_engines_files_summed_per_served_model(tmp_path, monkeypatch):
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    for engine, (model, scale) in enumerate((("qwen", 1), ("qwen", 10), ("llama", 100))):
        metrics_file = MetricsFile(model)
        metrics_file.path = tmp_path / f"engine-{engine}.json"
        metrics_file.write(worker_state(scale))
    text = exposition(tmp_path)
    rounds = place_of("policy_rounds")
    assert f'vllm:specextend_policy_rounds_total{{model_name="qwen"}} {11.0 * rounds}' in text
    assert f'vllm:specextend_policy_rounds_total{{model_name="llama"}} {100.0 * rounds}' in text
    # The latest round's requests: a gauge, summed over the model's engines.
    aside = place_of("policy_latest_stepped_aside")
    assert f'vllm:specextend_requests_stepped_aside{{model_name="qwen"}} {11.0 * aside}' in text
    assert '# TYPE vllm:specextend_requests_stepped_aside gauge' in text
    assert 'vllm:specextend_policy_picks_total{length="0",model_name="qwen"} 55.0' in text
    assert 'vllm:specextend_policy_picks_total{length="4",model_name="llama"} 200.0' in text


def test_written_at_most_once_a_second_unless_forced(tmp_path, monkeypatch):
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    metrics_file = MetricsFile("qwen")
    metrics_file.write({"refreshes": 1})
    assert not metrics_file.due()  # the worker builds no state to skip
    metrics_file.write({"refreshes": 2})  # within the second: skipped
    assert 'refreshes_total{model_name="qwen"} 1.0' in exposition(tmp_path)
    metrics_file.write({"refreshes": 3}, force=True)  # the last request finished
    assert 'refreshes_total{model_name="qwen"} 3.0' in exposition(tmp_path)


def test_nothing_shown_without_an_engine_and_a_vanished_folder_stops_writes(tmp_path,
                                                                            monkeypatch):
    assert "specextend" not in exposition(tmp_path)
    monkeypatch.delenv(METRICS_DIR_ENV, raising=False)
    assert not MetricsFile("qwen").due(force=True)  # offline: no front end of ours
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path / "gone"))
    metrics_file = MetricsFile("qwen")
    metrics_file.write(worker_state(1), force=True)
    assert metrics_file.failed


def test_a_key_an_engine_lacks_is_not_shown(tmp_path, monkeypatch):
    """The policy off: its metrics absent, the working caches' shown."""
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    MetricsFile("qwen").write({"refreshes": 7, "working_caches": 4}, force=True)
    text = exposition(tmp_path)
    assert 'vllm:specextend_refreshes_total{model_name="qwen"} 7.0' in text
    assert 'vllm:specextend_working_caches{model_name="qwen"} 4.0' in text
    assert "policy" not in text and "refresh_seconds" not in text


def test_each_engine_configuration_gets_its_own_folder_and_collector(monkeypatch):
    """A front end counts only its own engines: a folder inherited from a
    parent process (which configured engines of its own) is replaced."""
    from prometheus_client import REGISTRY

    from vllm_specextend import metrics

    monkeypatch.setenv(METRICS_DIR_ENV, "/a/parent/front/end/folder")
    metrics.register_metrics()
    first, first_collector = metrics.metrics_dir(), metrics._collector
    metrics.register_metrics()
    assert metrics.metrics_dir() != first and metrics.metrics_dir().is_dir()
    assert first_collector not in REGISTRY._collector_to_names
    assert metrics._collector in REGISTRY._collector_to_names
    REGISTRY.unregister(metrics._collector)
    metrics._collector = None
    monkeypatch.delenv(METRICS_DIR_ENV)
    assert MetricsFile("qwen").failed  # no front end of ours: nothing written
