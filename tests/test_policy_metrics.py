"""The speculation policy's metrics between processes: worker files summed
by the front end's Prometheus collector (no vLLM)."""

from prometheus_client import CollectorRegistry, generate_latest

from vllm_specextend.metrics import (
    METRICS_DIR_ENV,
    POLICY_METRICS,
    PolicyMetricsCollector,
    PolicyMetricsFile,
)


def worker_state(scale: int) -> dict:
    state = {key: scale * (index + 1) for index, (key, *_) in enumerate(POLICY_METRICS)}
    state["policy_picks_by_length"] = [scale * 5, scale, 0, 0, scale * 2]
    return state


def exposition(folder) -> str:
    registry = CollectorRegistry()
    registry.register(PolicyMetricsCollector(folder))
    return generate_latest(registry).decode()


def test_engines_files_summed_per_served_model(tmp_path, monkeypatch):
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    for engine, (model, scale) in enumerate((("qwen", 1), ("qwen", 10), ("llama", 100))):
        metrics_file = PolicyMetricsFile(model)
        metrics_file.path = tmp_path / f"engine-{engine}.json"
        metrics_file.write(worker_state(scale))
    text = exposition(tmp_path)
    assert 'vllm:specextend_policy_rounds_total{model_name="qwen"} 11.0' in text
    assert 'vllm:specextend_policy_rounds_total{model_name="llama"} 100.0' in text
    # The latest round's requests: a gauge, summed over the model's engines.
    assert 'vllm:specextend_requests_stepped_aside{model_name="qwen"} 99.0' in text
    assert '# TYPE vllm:specextend_requests_stepped_aside gauge' in text
    assert 'vllm:specextend_policy_picks_total{length="0",model_name="qwen"} 55.0' in text
    assert 'vllm:specextend_policy_picks_total{length="4",model_name="llama"} 200.0' in text


def test_written_at_most_once_a_second_unless_a_request_finished(tmp_path, monkeypatch):
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    metrics_file = PolicyMetricsFile("qwen")
    metrics_file.write(worker_state(1))
    metrics_file.write(worker_state(2))  # within the second: skipped
    assert 'policy_rounds_total{model_name="qwen"} 1.0' in exposition(tmp_path)
    metrics_file.write(worker_state(3), force=True)
    assert 'policy_rounds_total{model_name="qwen"} 3.0' in exposition(tmp_path)


def test_nothing_shown_without_an_engine_and_a_vanished_folder_stops_writes(tmp_path,
                                                                            monkeypatch):
    assert "specextend" not in exposition(tmp_path)
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path / "gone"))
    metrics_file = PolicyMetricsFile("qwen")
    metrics_file.write(worker_state(1), force=True)
    assert metrics_file.failed
