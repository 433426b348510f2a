"""Line tracer for `benchmarks/trace_path.py`, loaded by every Python process (the driver and
its Ray workers) whose PYTHONPATH starts with this folder; inert unless DSMOOTH_TRACE_DIR is set.

It records the project lines (pipeline/, actors/, jobs/ under DSMOOTH_TRACE_ROOT) that run
*inside the per-image loop*:

- in the driver: while `CertifyRun.run` is on a stack (any thread);
- in a Ray worker: in an actor method other than `__init__` that started while the driver was
  in its loop (the actors' construction, i.e. loading models and fetching their checkpoints
  from the job's blob store, is set-up, not the loop). The driver marks its loop's start and
  end with two files in DSMOOTH_TRACE_DIR; a worker looks at them when a method starts.

Each process writes DSMOOTH_TRACE_DIR/<pid>.json (every half second and at exit), so a
worker killed at shutdown loses at most its last half second (after the loop has ended).
Python 3.11 has no sys.monitoring: sys.settrace / threading.settrace, plus a wrapper around
Ray's actor-method executor for the threads Ray starts itself (threaded actors).
"""

from __future__ import annotations

import os

if os.environ.get("DSMOOTH_TRACE_DIR"):
    import atexit
    import json
    import sys
    import threading

    _DIR = os.environ["DSMOOTH_TRACE_DIR"]
    _ROOT = os.path.realpath(os.environ["DSMOOTH_TRACE_ROOT"]) + os.sep
    _TOP = ("pipeline" + os.sep, "actors" + os.sep, "jobs" + os.sep)
    _LOOP = os.environ.get("DSMOOTH_TRACE_LOOP", "CertifyRun.run")
    _state = {"depth": 0, "worker_loop": False, "role": "driver", "changed": False}
    _lines: dict[str, set[int]] = {}
    _mine: dict[str, str | None] = {}

    def _project(filename: str) -> str | None:
        known = _mine.get(filename, 0)
        if known != 0:
            return known
        path = os.path.realpath(filename)
        rel = path[len(_ROOT):] if path.startswith(_ROOT) else None
        result = rel if rel is not None and rel.startswith(_TOP) else None
        _mine[filename] = result
        return result

    def _mark(name: str) -> None:
        path = os.path.join(_DIR, name)
        if not os.path.exists(path):
            open(path, "w").close()

    def _driver_in_loop() -> bool:
        return os.path.exists(os.path.join(_DIR, "loop-open")) and not os.path.exists(
            os.path.join(_DIR, "loop-closed"))

    def _in_loop() -> bool:
        return _state["depth"] > 0 or _state["worker_loop"]

    def _local(rel: str, is_loop_frame: bool):
        def trace(frame, event, arg):
            if event == "line" and _in_loop():
                seen = _lines.setdefault(rel, set())
                if frame.f_lineno not in seen:
                    seen.add(frame.f_lineno)
                    _state["changed"] = True
            elif event == "return" and is_loop_frame:
                _state["depth"] -= 1
                if _state["depth"] == 0:
                    _mark("loop-closed")
            return trace
        return trace

    def _global(frame, event, arg):
        if event != "call":
            return None
        rel = _project(frame.f_code.co_filename)
        if rel is None:
            return None
        is_loop_frame = frame.f_code.co_qualname == _LOOP
        if is_loop_frame:
            _state["depth"] += 1
            _mark("loop-open")
        if _in_loop():  # the frame's first line counts too (a `def` line, as coverage tools do)
            seen = _lines.setdefault(rel, set())
            if frame.f_code.co_firstlineno not in seen:
                seen.add(frame.f_code.co_firstlineno)
                _state["changed"] = True
        return _local(rel, is_loop_frame)

    def _flush() -> None:
        if not _state["changed"]:
            return
        _state["changed"] = False
        data = {"pid": os.getpid(), "role": _state["role"], "argv": sys.argv[:3],
                "lines": {k: sorted(v) for k, v in list(_lines.items())}}
        tmp = os.path.join(_DIR, f".{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, os.path.join(_DIR, f"{os.getpid()}.json"))

    def _flusher() -> None:
        import time

        while True:
            time.sleep(0.5)
            try:
                if _lines:
                    _flush()
            except Exception:  # noqa: BLE001 - a tracer never breaks the traced process
                pass

    class _PatchRay:
        """After Ray's function manager is imported: wrap each actor method's executor so the
        thread that runs it is traced and the worker's loop counts from its first call."""

        def find_spec(self, name, path=None, target=None):
            if name != "ray._private.function_manager":
                return None
            import importlib.machinery

            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                _patch(module.FunctionActorManager)

            spec.loader.exec_module = exec_module
            return spec

    def _patch(manager_class) -> None:
        original = manager_class._make_actor_method_executor

        def make(manager, method_name, method):
            executor = original(manager, method_name, method)

            def traced(*args, **kwargs):
                _state["role"] = "worker"
                _state["worker_loop"] = method_name != "__init__" and _driver_in_loop()
                if sys.gettrace() is None:
                    sys.settrace(_global)
                return executor(*args, **kwargs)

            traced.__name__ = executor.__name__
            traced.name, traced.method = method_name, method  # what Ray's task executor reads
            return traced

        manager_class._make_actor_method_executor = make

    sys.meta_path.insert(0, _PatchRay())
    threading.Thread(target=_flusher, daemon=True, name="dsmooth-trace").start()
    atexit.register(lambda: _lines and _flush())
    threading.settrace(_global)
    sys.settrace(_global)
