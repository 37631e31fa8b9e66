"""The ``sim`` backend: synthetic sensor, software ISP, two frame channels,
software AVPU.  Behaves like a T31 (channel layout, NV12, controls)."""

from __future__ import annotations

import logging

from ..base import Backend, Encoder, SensorInfo
from .channel import SimFrameChannel
from .isp import SimIsp
from .motion import SimLightMeter, SimMotionSource
from .sensor import FileScene, Scene, SensorClock, SyntheticScene

log = logging.getLogger("impv4l2.sim")


class SimBackend(Backend):
    """Sim hardware.

    Options: ``width``/``height`` of the sensor (default 1920x1080), ``fps``
    (sensor rate, default 25), ``source`` (a video or image file to use as
    the sensor input instead of the test pattern), ``mains_hz`` (50 or 60:
    the simulated lighting's mains frequency, for flicker banding),
    ``sub_size`` (largest size of the sub channel, default 640x360),
    ``moving`` (the test pattern's box slides; False: it stands still until
    :meth:`set_scene` starts it) and ``light`` (the scene's illumination, 1.0 =
    well lit; lower darkens the picture and raises the light meter's gain).

    Motion and light are backend options plus :meth:`set_scene` rather than V4L2
    controls: they are the world in front of the lens, not a camera setting, and
    a sim-only control would make the sim's V4L2 surface differ from the t31's.
    """

    name = "sim"

    def __init__(self, width: int = 1920, height: int = 1080, fps: int = 25,
                 source: str | None = None, mains_hz: int = 50,
                 sub_size: tuple[int, int] = (640, 360), moving: bool = True,
                 light: float = 1.0) -> None:
        if fps <= 0 or fps > 60:
            raise ValueError(f"sensor fps {fps} out of range")
        self.isp = SimIsp(SensorInfo("sim-1080p" if (width, height) == (1920, 1080)
                                     else f"sim-{width}x{height}", width, height, fps),
                          mains_hz=mains_hz)
        self.scene: Scene = FileScene(source) if source else SyntheticScene(fps, bool(moving), float(light))
        self.clock = SensorClock(fps, self.scene, self.isp.tuning)
        sub = (min(sub_size[0], width), min(sub_size[1], height))
        # Channels get what they use, not the backend: the clock, the scene, the sensor, and
        # AVPU channels from whatever encoder the backend has when a stream starts.
        feeds = dict(clock=self.clock, scene=lambda: self.scene, sensor=self.isp.sensor,
                     encoders=lambda params: self.encoder.create_channel(params))
        self.channels = (
            SimFrameChannel(0, "main", (width, height), **feeds),
            SimFrameChannel(1, "sub", sub, **feeds),
        )
        self._encoder: Encoder | None = None
        self.motion = SimMotionSource(self, self.channels[1].sizes()[-1])
        self.light_meter = SimLightMeter(self)
        log.info("sim backend: %dx%d@%d, source %s", width, height, fps, source or "pattern")

    @property
    def encoder(self) -> Encoder:  # type: ignore[override]
        """The software AVPU, created on first use (PyAV/libx264)."""
        if self._encoder is None:
            from .avpu import SimAvpu  # noqa: PLC0415 (lazy: heavy import)
            self._encoder = SimAvpu()
        return self._encoder

    @encoder.setter
    def encoder(self, value: Encoder) -> None:
        self._encoder = value

    @property
    def overruns(self) -> int:
        return self.clock.skipped

    def set_scene(self, moving: bool | None = None, light: float | None = None) -> None:
        """Change what the sensor sees (the synthetic scene; a file's motion is its own)."""
        scene = self.scene
        if moving is not None and isinstance(scene, SyntheticScene):
            scene.set_moving(moving)
        if light is not None:
            scene.light = float(light)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.motion is not None:
            self.motion.stop()
        for ch in self.channels:
            ch.stop()
        self.clock.close()
        self.scene.close()
