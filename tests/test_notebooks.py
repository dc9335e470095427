"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom.

Execution uses nbclient and a Python kernel of this interpreter (the ``test`` extra installs
them); each notebook runs its smoke variant (``QFLAX_NOTEBOOK_SMOKE=1``, read in its parameter
cell: the same cells on tiny data and models), on CPU, with matplotlib's Agg backend, its
workdirs under a temporary folder. ``make notebooks`` runs the full variants and writes HTML.
"""

import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# The notebooks issue 20 asks for; a deleted or renamed one fails test_the_notebooks_are_there.
REQUIRED = (
    "01_quickstart",
    "02_quantizer_gallery",
    "03_pairs",
    "04_learned_bitwidths",
    "05_deploy",
    "06_gradient_quantization",
    "07_latent_codes",
)

# One notebook's smoke run takes seconds; the limit only stops a hung kernel.
CELL_TIMEOUT_S = 600


def test_the_notebooks_are_there():
    names = [path.stem for path in NOTEBOOKS]
    missing = [name for name in REQUIRED if name not in names]
    assert not missing, f"notebooks/ lacks {missing}; it has {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    """Outputs are stripped in git: they are large, binary and change on every run."""
    notebook = json.loads(path.read_text())
    dirty = [
        i
        for i, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code"
        and (cell.get("outputs") != [] or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} hold outputs or execution counts; strip them "
        f"(jupyter nbconvert --clear-output --inplace {path.relative_to(REPO)})"
    )


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    """The environment the kernels inherit, and a kernel spec that runs this interpreter."""
    pytest.importorskip(
        "nbclient",
        reason="executing the notebooks needs nbclient and ipykernel (pip install -e '.[test]')",
    )
    pytest.importorskip("ipykernel", reason="the notebooks need a Python kernel (ipykernel)")
    root = tmp_path_factory.mktemp("notebooks")
    # A "python3" kernel spec on JUPYTER_PATH (searched first) that runs sys.executable, so the
    # kernel is this virtualenv's Python whatever kernels the user has installed.
    spec_dir = root / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "qflax test kernel", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    env = {
        "JUPYTER_PATH": str(root / "jupyter"),
        "JAX_PLATFORMS": "cpu",
        "MPLBACKEND": "Agg",
        "QFLAX_NOTEBOOK_SMOKE": "1",
        "QFLAX_NOTEBOOK_RUNS": str(root / "runs"),
        # The notebooks compile many of the same small programs (model inits, train and eval
        # steps of the same tiny models): one persistent compilation cache for all of them.
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    for key, value in env.items():
        monkeypatch_module.setenv(key, value)
    return env


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


class _Kernel:
    """One kernel for all the notebooks of a session (see test_notebook_runs)."""

    manager = None


RESET = "%reset -f\nimport matplotlib.pyplot\nmatplotlib.pyplot.close('all')\ndel matplotlib"


@pytest.fixture(scope="module")
def kernel(kernel_env):
    shared = _Kernel()
    yield shared
    if shared.manager is not None:
        from jupyter_core.utils import run_sync

        run_sync(shared.manager.shutdown_kernel)(now=True)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel):
    """Runs every cell of the notebook's smoke variant; any error fails with the cell named.

    The notebooks share one kernel, whose namespace is cleared before each (``%reset -f``:
    a notebook that relied on another's variables fails here too): starting a kernel and
    importing JAX, Flax and qflax again for each would cost more than most notebooks' cells.
    Modules stay imported, and registries keep what a notebook registered.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(RESET))
    if kernel.manager is not None and not kernel.manager.has_kernel:
        kernel.manager = None
    client = NotebookClient(
        notebook,
        km=kernel.manager,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        # The kernel's working directory: the repository root (experiments/ imports from it).
        resources={"metadata": {"path": str(REPO)}},
    )
    try:
        client.execute(cleanup_kc=False)  # CellExecutionError names the cell on any error
    finally:
        kernel.manager = client.km
        if client.kc is not None:
            client.kc.stop_channels()
    # The kernel saw the smoke switch (each notebook's setup cell prints which variant ran).
    printed = "".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "| smoke" in printed, f"{path.name} did not run its smoke variant"
