"""benchmarks/<name>.py imported as a module, for the tests of the benchmark scripts."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))          # the scripts import their siblings (common, ...)


def load_script(name: str) -> ModuleType:
    """The script, registered in sys.modules under its name, as its siblings import it (and as
    dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
