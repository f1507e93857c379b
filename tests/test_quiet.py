"""The command line and the demo keep TensorFlow's start-up log lines off stderr, and hide
nothing else: each runs in a subprocess with a clean environment (no TF_CPP_MIN_LOG_LEVEL;
the demo's run is tests/test_demo.py's)."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

# TensorFlow's start-up lines, and any line of its C++ logging (I/W/E + date, or glog's form)
TF_LINES = re.compile(r"oneDNN custom operations|absl::InitializeLog|This TensorFlow binary is optimized"
                      r"|rebuild TensorFlow|Unable to register cu|computation placer|TensorRT|cuda drivers"
                      r"|^[IWEF]\d{4} \d\d:\d\d:\d\d|^\d{4}-\d\d-\d\d [\d:.]+: [IWEF] ", re.M)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "KERAS_", "ABSL"))}
    return {**env, **extra}


def python(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env())


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    keras = pytest.importorskip("keras")
    path = tmp_path_factory.mktemp("quiet") / "tiny.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="body"),
                      keras.layers.Dense(2, name="head")]).save(path)
    return path


@pytest.mark.parametrize("command", [["plan", "{}", "--spec", "freeze"], ["summary", "{}"]], ids=["plan", "summary"])
def test_the_command_line_on_a_keras_file_prints_no_tensorflow_start_up_lines(keras_file, command):
    result = python("-m", "layerlock.cli", *[c.format(keras_file) for c in command])
    assert result.returncode == 0, result.stderr
    assert not TF_LINES.search(result.stderr), result.stderr
    assert "body" in result.stdout


@pytest.fixture
def fake_keras(tmp_path):
    """A ``keras`` that writes TensorFlow's start-up line and a real error to file descriptor 2."""
    (tmp_path / "keras.py").write_text(textwrap.dedent("""
        import os
        os.write(2, b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. You may see...\\n")
        os.write(2, b"E0000 00:00:1.0 1 real.cc:1] something real went wrong\\n")
        if os.environ.get("FAIL"):
            raise ImportError("keras is broken")
    """))
    return clean_env(PYTHONPATH=str(tmp_path))


def test_the_filter_drops_only_the_start_up_lines_and_keeps_real_errors(fake_keras):
    code = "from layerlock.demo.report import import_keras; import_keras(); print('imported')"
    result = python("-c", code, env=fake_keras)
    assert result.stdout == "imported\n"
    assert result.stderr == "E0000 00:00:1.0 1 real.cc:1] something real went wrong\n"
    failed = python("-c", code, env={**fake_keras, "FAIL": "1"})
    assert failed.returncode == 1 and "real went wrong" in failed.stderr and "keras is broken" in failed.stderr


def test_tf_cpp_min_log_level_0_shows_everything(fake_keras):
    code = "from layerlock.demo.report import import_keras; import_keras()"
    result = python("-c", code, env={**fake_keras, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert "oneDNN custom operations are on" in result.stderr and "real went wrong" in result.stderr
