"""ipywidgets panels bound to plugins through the core.

* :class:`PluginPanel`: one control per parameter (FloatSlider / IntSlider / Dropdown /
  Checkbox) labelled with name, unit and display text, a bypass toggle, a preset dropdown with
  save, and an "editing" marker fed by other users' USER_CURSOR_UPDATE.
* :class:`TrackPanel`: the panels of a track's chain plus render-and-play (audio player,
  waveform and spectrum).
* :class:`PresencePanel`: who is in the session.

Binding rules (two-way, no echo loops, no lost updates):

* A user's move calls the lab (PLUGIN_PARAMETER through the core, on the lab's loop - the
  callback may run on a subshell thread); a refused value puts the control back to the
  engine's value and shows the error.
* A change from elsewhere (a PLUGIN_STATE_UPDATE / relay broadcast) sets the control while an
  origin flag is up, so the observer does not send it back; values are rounded to the control's
  step first, because the browser would otherwise answer with its own rounded value.
* A panel's own move is not applied back to that panel when the lab reports it (other panels
  of the same plugin do show it), so a fast drag never makes the control jump back.
* Every ``observe`` has its ``unobserve`` in :meth:`PluginPanel.close`.
"""

from __future__ import annotations

import contextvars
import html
import io
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as w
import numpy as np

from .engine import Plugin
from .errors import PluginlabError
from .parameters import ParameterSpec

if TYPE_CHECKING:
    from .lab import Lab

__all__ = ["PluginPanel", "PresencePanel", "TrackPanel", "control_for"]

_REMOTE = contextvars.ContextVar("pluginlab_widget_remote", default=False)
# The panel whose user move is being sent (set inside that send's own task). The lab shows the
# kernel's own changes to its listeners, so the sending panel would otherwise be set back to
# each of its earlier values as their replies arrive: during a fast drag the slider jumped back
# (0.4, 0.5, 0.6 -> 0.4, 0.5, 0.6 again) and each jump was sent to the browser.
_ORIGIN: contextvars.ContextVar[PluginPanel | None] = contextvars.ContextVar(
    "pluginlab_widget_origin", default=None)


def control_for(spec: ParameterSpec, value: float) -> w.ValueWidget:
    """The ipywidgets control for one parameter, at ``value``."""
    style = {"description_width": "140px"}
    layout = w.Layout(width="420px")
    label = f"{spec.name}" + (f" ({spec.unit})" if spec.unit else "")
    if spec.kind == "bool":
        return w.Checkbox(value=value >= 0.5, description=label, style=style, indent=False)
    if spec.kind == "choice" and spec.choices:
        return w.Dropdown(options=[(c, i) for i, c in enumerate(spec.choices)],
                          value=int(round(value)), description=label, style=style, layout=layout)
    if spec.kind == "int":
        return w.IntSlider(value=int(round(value)), min=int(spec.min), max=int(spec.max),
                           step=int(spec.step or 1), description=label, style=style,
                           layout=layout)
    step = spec.step or (spec.max - spec.min) / 1000.0
    decimals = max(0, min(4, -math.floor(math.log10(step) + 1e-9))) if step > 0 else 3
    return w.FloatSlider(value=_on_step(value, spec.min, step), min=spec.min, max=spec.max,
                         step=step, description=label, style=style, layout=layout,
                         readout_format=f".{decimals}f", continuous_update=True)


def _code(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


def _error_html(exc: BaseException) -> str:
    """An error as a panel's status line shows it."""
    return f"<span style='color:#b00'>{html.escape(str(exc))}</span>"


def _on_step(value: float, lo: float, step: float) -> float:
    if step <= 0:
        return value
    return round(lo + round((value - lo) / step) * step, 10)


class PluginPanel:
    """Controls for one plugin. Display it (``display(panel)``) or use ``panel.widget``."""

    def __init__(self, lab: Lab, plugin: Plugin) -> None:
        self.lab = lab
        self.plugin = plugin
        values = plugin.values
        self.controls: dict[str, w.ValueWidget] = {
            pid: control_for(spec, values[pid]) for pid, spec in plugin.parameters.items()}
        self.texts = {pid: w.HTML(_code(self._placeholder(pid))) for pid in self.controls}
        self._stale_texts: set[str] = set()  # a binary's texts to read from the plugin
        # Moves of this panel's controls not yet applied, per parameter, and the parameters
        # whose control showed someone else's value meanwhile (see _send). Moves start on a
        # widget thread, so both are guarded.
        self._moves_lock = threading.Lock()
        self._moving: dict[str, int] = {}
        self._overtaken: set[str] = set()
        self._text_reader: Any = None  # the task reading them, while it runs
        self._closed = False
        if plugin.kind != "builtin":  # a built-in's placeholder is already its text
            for pid in self.controls:
                self._refresh_text(pid)  # one owner call reads them all
        self.editing = {pid: w.HTML("") for pid in self.controls}
        self._editors: dict[str, Any] = {}  # user -> the parameter their cursor is on
        self._cursor_on: str | None = None  # the parameter this panel last announced
        self.bypass = w.ToggleButton(value=plugin.bypass, description="bypass", icon="power-off")
        self.presets = w.Dropdown(options=[""] + plugin.presets(), description="preset")
        self.preset_name = w.Text(placeholder="new preset name", layout=w.Layout(width="180px"))
        self.save = w.Button(description="save preset")
        self.status = w.HTML("")
        self._observers: list[tuple[w.Widget, Callable[..., None], str]] = []
        for pid, control in self.controls.items():
            self._observe(control, self._make_handler(pid), "value")
        self._observe(self.bypass, self._on_bypass, "value")
        self._observe(self.presets, self._on_preset, "value")
        self.save.on_click(self._on_save)
        self._unlisten = lab.listen(self._on_message)
        rows = [w.HBox([self.controls[p], self.texts[p], self.editing[p]]) for p in self.controls]
        title = w.HTML(f"<b>{plugin.name}</b> <code>{plugin.id}</code> on "
                       f"<code>{plugin.track_id}</code>")
        header = w.HBox([title, self.bypass])
        presets = w.HBox([self.presets, self.preset_name, self.save])
        self.widget = w.VBox([header, *rows, presets, self.status],
                             layout=w.Layout(border="1px solid #ddd", padding="6px"))

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        """Disconnect every observer and listener, close the widgets."""
        self._closed = True
        for widget, handler, name in self._observers:
            widget.unobserve(handler, names=name)
        self._observers.clear()
        self._unlisten()
        self.widget.close()

    # -- user -> core ---------------------------------------------------------------------------
    def _observe(self, widget: w.Widget, handler: Callable[..., None], name: str) -> None:
        widget.observe(handler, names=name)
        self._observers.append((widget, handler, name))

    def _make_handler(self, pid: str) -> Callable[[dict[str, Any]], None]:
        def handler(change: dict[str, Any]) -> None:
            if _REMOTE.get():
                return
            value = change["new"]
            value = float(value) if not isinstance(value, bool) else (1.0 if value else 0.0)
            with self._moves_lock:
                self._moving[pid] = self._moving.get(pid, 0) + 1
            if not self._submit(self._send(pid, value)):
                self._moved(pid)
        return handler

    async def _send(self, pid: str, value: float) -> None:
        """Apply one move. Its own echo is not shown (the control already shows it), but if
        someone else's value reached the control while this panel's moves were on their way,
        the last of them puts the control on the engine's value, which the core decided."""
        _ORIGIN.set(self)  # this task's context only (see _on_message)
        try:
            if self._cursor_on != pid:  # colleagues see what the notebook user edits
                self._cursor_on = pid
                await self.lab.cursor(track_id=self.plugin.track_id, plugin_id=self.plugin.id,
                                      parameter_id=pid)
            await self.lab.set(self.plugin, pid, value)
            self._refresh_text(pid)
            self.status.value = ""
        except Exception as exc:  # noqa: BLE001 - shown in the panel, control put back
            self._error(exc)
            self._show(pid, self.plugin.get(pid))
        finally:
            if self._moved(pid):
                self._show(pid, self.plugin.get(pid))

    def _moved(self, pid: str) -> bool:
        """One move of ``pid`` is done; True when it was the last and the control was
        overtaken by another value meanwhile."""
        with self._moves_lock:
            left = self._moving[pid] = self._moving.get(pid, 1) - 1
            if left or pid not in self._overtaken:
                return False
            self._overtaken.discard(pid)
            return True

    def _on_bypass(self, change: dict[str, Any]) -> None:
        if not _REMOTE.get():
            self._submit(self._send_bypass(bool(change["new"])))

    async def _send_bypass(self, bypass: bool) -> None:
        try:
            await self.lab.bypass(self.plugin, bypass)
            self.status.value = ""
        except Exception as exc:  # noqa: BLE001 - shown in the panel, toggle put back
            self._error(exc)
            with _remote():
                self.bypass.value = self.plugin.bypass

    def _submit(self, coro: Any) -> bool:
        """Hand ``coro`` to the lab's loop; a lab that is gone is reported in the panel
        (False)."""
        try:
            self.lab.submit(coro)
        except RuntimeError as exc:
            self._error(exc)
            return False
        return True

    def _error(self, exc: Exception) -> None:
        self.status.value = _error_html(exc)

    def _on_preset(self, change: dict[str, Any]) -> None:
        if _REMOTE.get() or not change["new"]:
            return

        async def load() -> None:
            name = change["new"]
            try:
                reply = await self.lab.preset(self.plugin, "load", name)
                self.apply(reply.get("parameters") or {})
                self.status.value = f"loaded preset {html.escape(name)!r}"
            except Exception as exc:  # noqa: BLE001 - shown in the panel
                self._error(exc)
            with _remote():  # a load is an action, not a state: picking it again reloads it
                self.presets.value = ""

        self._submit(load())

    def _on_save(self, _button: Any) -> None:
        name = self.preset_name.value.strip()
        if not name:
            self.status.value = "give the preset a name first"
            return

        async def save() -> None:
            try:
                await self.lab.preset(self.plugin, "save", name)
                with _remote():
                    self.presets.options = [""] + self.plugin.presets()
                self.status.value = f"saved preset {name!r}"
            except Exception as exc:  # noqa: BLE001 - shown in the panel
                self._error(exc)

        self._submit(save())

    # -- core -> widgets ------------------------------------------------------------------------
    def apply(self, values: dict[str, Any]) -> None:
        """Show ``values`` (from elsewhere) without sending them back."""
        for pid, value in values.items():
            if pid in self.controls:
                with self._moves_lock:
                    if self._moving.get(pid):
                        self._overtaken.add(pid)
                self._show(pid, float(value))

    def _show(self, pid: str, value: float) -> None:
        control = self.controls[pid]
        spec = self.plugin.parameters[pid]
        with _remote():
            if isinstance(control, w.Checkbox):
                control.value = value >= 0.5
            elif isinstance(control, (w.Dropdown, w.IntSlider)):
                control.value = int(round(value))
            else:
                control.value = _on_step(value, spec.min, float(control.step))
        self._refresh_text(pid)

    def _on_message(self, message: dict[str, Any]) -> None:
        data = message.get("data") or {}
        if message.get("type") == "PRESENCE" and data.get("event") == "left":
            if self._editors.pop(str(data.get("user_id")), None) is not None:
                self._show_editors()  # who left edits nothing any more
            return
        if message.get("type") == "USER_CURSOR_UPDATE" and data.get("plugin_id") != self.plugin.id:
            if self._editors.pop(str(data.get("user_id")), None) is not None:
                self._show_editors()  # moved on to another plugin
            return
        if data.get("plugin_id") != self.plugin.id:
            return
        kind = message.get("type")
        if kind in ("PLUGIN_STATE_UPDATE", "PLUGIN_PARAMETER_BATCH", "PLUGIN_PRESET"):
            self.apply(data.get("parameters") or {})
        elif kind == "PLUGIN_PARAMETER":
            if _ORIGIN.get() is self:  # our own move coming back: the control already shows it
                return
            self.apply({data["parameter_id"]: data["parameter_value"]})
        elif kind == "PLUGIN_REMOVE":
            self._removed(str(message.get("user_id")))
        elif kind == "PLUGIN_BYPASS":
            with _remote():
                self.bypass.value = bool(data.get("bypass"))
        elif kind == "USER_CURSOR_UPDATE":
            self._editors[str(data.get("user_id"))] = data.get("parameter_id")
            self._show_editors()

    def _show_editors(self) -> None:
        """Mark each parameter with everyone editing it (USER_CURSOR_UPDATE, per user)."""
        for pid, label in self.editing.items():
            users = sorted(u for u, edited in self._editors.items() if edited == pid)
            label.value = f"<i>✎ {html.escape(', '.join(users))}</i>" if users else ""

    def _removed(self, user: str) -> None:
        """The plugin is gone: every control is disabled and the panel says who removed it."""
        for control in [*self.controls.values(), self.bypass, self.presets, self.preset_name,
                        self.save]:
            control.disabled = True
        self.status.value = f"<i>removed by {html.escape(user)}</i>"

    def _placeholder(self, pid: str) -> str:
        """What a parameter's text shows before a binary's own text arrives."""
        if self.plugin.kind == "builtin":
            return self._builtin_text(pid)
        return f"{self.plugin.get(pid):.3f}"

    def _builtin_text(self, pid: str) -> str:
        """A built-in's display text, or "" where it would only repeat the slider's own
        readout (a number without a unit: "0.30 0.30")."""
        spec = self.plugin.parameters[pid]
        if spec.kind == "float" and not spec.unit:
            return ""
        return self.plugin.text(pid)

    def _refresh_text(self, pid: str) -> None:
        """Show the display text of ``pid``'s current value.

        A built-in's is formatted here. A binary's own text ("2.4 s") needs the engine's owner
        thread, which may be rendering: it is read in the background, several parameters in
        one owner call, and the label keeps its previous text until then (the loop never waits).
        """
        if self.plugin.kind == "builtin":
            self.texts[pid].value = _code(self._builtin_text(pid))
            return
        self._stale_texts.add(pid)
        if self._text_reader is None:
            self._text_reader = self.lab.submit(self._read_texts())

    async def _read_texts(self) -> None:
        try:
            while self._stale_texts and not self._closed:
                ids, self._stale_texts = sorted(self._stale_texts), set()
                texts = await self.plugin.texts_async(ids)
                for pid, text in texts.items():
                    self.texts[pid].value = _code(text)
        except Exception as exc:  # noqa: BLE001 - e.g. the plugin was removed: shown, not raised
            self._error(exc)
        finally:
            self._text_reader = None


class TrackPanel:
    """A track's chain as panels, plus render-and-play with waveform and spectrum. The chain
    follows the session: a plugin anyone adds to the track gets its panel (in chain order),
    a removed one's panel goes."""

    def __init__(self, lab: Lab, track_id: str, seconds: float = 4.0) -> None:
        self.lab = lab
        self.track_id = track_id
        self.panels = [PluginPanel(lab, p) for p in lab.engine.track(track_id).plugins]
        self.seconds = w.FloatText(value=seconds, description="seconds",
                                   layout=w.Layout(width="160px"))
        self.button = w.Button(description="render & play", icon="play")
        self.status = w.HTML("")
        self.output = w.Output()
        self.last_audio: np.ndarray | None = None
        self.button.on_click(self._on_render)
        self._controls = w.HBox([self.seconds, self.button, self.status])
        self.widget = w.VBox()
        self._layout()
        self._unlisten = lab.listen(self._on_message)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        self._unlisten()
        for panel in self.panels:
            panel.close()
        self.widget.close()

    def _layout(self) -> None:
        self.widget.children = [*[p.widget for p in self.panels], self._controls, self.output]

    def _on_message(self, message: dict[str, Any]) -> None:
        data = message.get("data") or {}
        kind = message.get("type")
        if data.get("track_id") != self.track_id or kind not in ("PLUGIN_ADD", "PLUGIN_REMOVE"):
            return
        if kind == "PLUGIN_REMOVE":
            gone = [p for p in self.panels if p.plugin.id == data.get("plugin_id")]
            for panel in gone:
                self.panels.remove(panel)
                panel.close()
        else:
            try:
                plugin = self.lab.plugin(str(data.get("plugin_id")))
            except PluginlabError:
                return  # already removed again
            if any(p.plugin is plugin for p in self.panels):
                return
            chain = list(self.lab.engine.track(self.track_id).plugins)
            panel = PluginPanel(self.lab, plugin)
            self.panels.append(panel)
            order = {p.id: i for i, p in enumerate(chain)}
            self.panels.sort(key=lambda p: order.get(p.plugin.id, len(order)))
        self._layout()

    def _on_render(self, _button: Any) -> None:
        async def render_or_say_why() -> None:
            try:
                await self.render()
            except Exception as exc:  # noqa: BLE001 - a button has nobody to raise to
                self.status.value = _error_html(exc)

        try:
            self.lab.submit(render_or_say_why())
        except RuntimeError as exc:  # the lab is stopped
            self.status.value = _error_html(exc)

    async def render(self) -> np.ndarray:
        """Render the track, show an audio player and a waveform/spectrum figure."""
        from IPython.display import Audio, Image

        self.status.value = "<i>rendering...</i>"
        audio = await self.lab.render(float(self.seconds.value), self.track_id)
        self.status.value = ""
        self.last_audio = audio
        rate = self.lab.engine.sample_rate
        self.output.clear_output()
        self.output.append_display_data(Audio(audio, rate=rate))
        self.output.append_display_data(Image(_overview_png(audio, rate)))
        return audio


def _overview_png(audio: np.ndarray, rate: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.6))
    ax_wave, ax_spec = fig.subplots(1, 2)
    t = np.arange(audio.shape[1]) / rate
    ax_wave.plot(t, audio[0], linewidth=0.5)
    ax_wave.set_xlabel("s")
    ax_wave.set_title("waveform (left)")
    spectrum = np.abs(np.fft.rfft(audio[0] * np.hanning(audio.shape[1]))) + 1e-12
    freqs = np.fft.rfftfreq(audio.shape[1], 1 / rate)
    ax_spec.semilogx(freqs[1:], 20 * np.log10(spectrum[1:] / spectrum.max()), linewidth=0.5)
    ax_spec.set_xlabel("Hz")
    ax_spec.set_ylim(-100, 5)
    ax_spec.set_title("spectrum (dB)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


class PresencePanel:
    """Who is connected to the lab's session (updated live from PRESENCE)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.widget = w.HTML(self._html())
        self._unlisten = lab.listen(self._on_message)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        self._unlisten()
        self.widget.close()

    def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "PRESENCE":
            self.widget.value = self._html()

    def _html(self) -> str:
        users = ", ".join(sorted(self.lab.members)) or "(nobody)"
        return f"<b>in session {self.lab.session_id}:</b> {users}"


class _remote:
    """Context manager raising the origin flag while widgets are set from elsewhere."""

    def __enter__(self) -> None:
        self._token = _REMOTE.set(True)

    def __exit__(self, *exc: object) -> None:
        _REMOTE.reset(self._token)
