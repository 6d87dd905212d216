import subprocess
import sys


def test_core_library_does_not_import_grpc() -> None:
    code = (
        "import sys, jobworker, jobworker.manager, jobworker.cgroup.controllers;"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_spawner_script_imports_only_the_standard_library() -> None:
    import jobworker._spawner as spawner

    code = (
        f"import runpy, sys; runpy.run_path({spawner.__file__!r}, run_name='not_main');"
        "print(sorted(m for m in sys.modules if m.startswith('jobworker')))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
