"""memwarden._plot.figure(): figures made without pyplot show inline in IPython."""
import pytest

pytest.importorskip("matplotlib")
IPython = pytest.importorskip("IPython")

from memwarden import _plot  # noqa: E402


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """An in-process IPython shell (what a notebook kernel runs), without history or profile files."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    config = Config()
    config.HistoryManager.enabled = False
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance(config=config)
    yield shell
    InteractiveShell.clear_instance()


def test_figure_has_a_png_display_in_ipython_without_pyplot(shell):
    # a fresh shell with no backend loaded: the figure alone would show as "<Figure size ...>"
    from matplotlib.figure import Figure

    with pytest.raises(KeyError):
        shell.display_formatter.formatters["image/png"].lookup_by_type(Figure)
    fig = _plot.figure(3, 2)
    fig.add_subplot().plot([0, 1], [1, 0])
    data, _ = shell.display_formatter.format(fig)
    assert "image/png" in data and len(data["image/png"]) > 100, sorted(data)


def test_a_format_chosen_before_is_kept(shell):
    from matplotlib.figure import Figure

    svg = shell.display_formatter.formatters["image/svg+xml"]
    svg.for_type(Figure, lambda fig: "<svg/>")
    fig = _plot.figure(3, 2)
    fig.add_subplot()
    data, _ = shell.display_formatter.format(fig)
    assert data.get("image/svg+xml") == "<svg/>" and "image/png" not in data


def test_nothing_is_registered_outside_ipython(monkeypatch):
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert _plot.figure(3, 2) is not None
