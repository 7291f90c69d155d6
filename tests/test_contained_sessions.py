"""``precision --check``, ``wait --check`` and ``harden`` run onnxruntime in the same contained child
process as ``inject`` (robaudit.injection.sandbox.open_session): the values are onnxruntime's, and a
crash or the memory limit of the child is one error line, not the end of the command's process."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import SAMPLES, run_in_process

from robaudit.errors import InjectionRuntimeError
from robaudit.injection import sandbox
from robaudit.injection.sandbox import Limits, open_session

MODEL = SAMPLES / "paper_mlp_sigmoid.onnx"


@pytest.mark.parametrize("isolate", [True, False], ids=["child", "here"])
def test_session_values_are_onnxruntimes(isolate):
    data = MODEL.read_bytes()
    reference = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = reference.get_inputs()[0].name
    out = reference.get_outputs()[0].name
    x = np.random.default_rng(0).uniform(0, 1, (5, 16)).astype(np.float32)
    session = open_session(data, Limits(timeout_s=60), isolate)
    try:
        (got,) = session.run([out], {name: x})
    finally:
        session.close()
    np.testing.assert_array_equal(got, reference.run([out], {name: x})[0])


def test_a_crashing_child_is_one_error():
    session = open_session(MODEL.read_bytes(), Limits(timeout_s=60))
    try:
        with pytest.raises(InjectionRuntimeError, match="crashed.*SIGABRT"):
            session.abort_for_test()
    finally:
        session.close()


@pytest.mark.parametrize("command", [
    ("precision", MODEL, "-e", "1", "--check", "--samples", "8"),
    ("wait", MODEL, "-e", "1", "--check", "--samples", "8"),
])
def test_the_checks_run_under_the_childs_memory_limit(command):
    """With a memory limit the session cannot be built under, the check fails in one line naming it:
    it ran in the child (in this process it would have succeeded)."""
    proc = run_in_process(*command, expect=2, env={"ROBAUDIT_INJECT_MEMORY_MB": "40"})
    assert proc.stderr.count("\n") == 1 and "memory" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    run_in_process(*command)  # the default limit leaves room


class _GoneParent:
    """A parent's end of the pipes that asks for ``messages`` in turn and has gone when the child answers."""

    def __init__(self, messages: list):
        self.messages, self.sent = list(messages), 0

    def recv(self):
        if not self.messages:
            raise EOFError
        message = self.messages.pop(0)
        if isinstance(message, BaseException):
            raise message
        return message

    def send(self, message) -> None:
        self.sent += 1
        raise BrokenPipeError(32, "Broken pipe")


class _Served:
    def __init__(self, value: int) -> None:
        self.value = value

    def ready(self) -> int:
        return self.value

    def run(self, x: int) -> int:
        return x + self.value


class _Failing:
    def __init__(self) -> None:
        raise ValueError("no session")


@pytest.mark.parametrize("messages", [
    [(_Served, (1,), Limits())],  # the parent gone before the session is ready
    [EOFError()],  # gone before it sent anything
    [(_Failing, (), Limits())],  # the session failed, and there is no one to tell
])
def test_a_child_whose_parent_has_gone_ends_quietly(messages):
    """Ctrl-C stops the parent; the child's answer then meets a broken pipe: it returns, nothing raised (it
    printed a BrokenPipeError traceback under the parent's report)."""
    parent = _GoneParent(messages)
    sandbox._serve(parent)  # returns instead of raising
    assert parent.sent == 1


def test_a_child_answers_until_its_parent_has_gone():
    class Replies(_GoneParent):
        def send(self, message) -> None:
            self.sent += 1
            if self.sent > 2:
                raise BrokenPipeError(32, "Broken pipe")
            self.answers = [*getattr(self, "answers", []), message]

    parent = Replies([(_Served, (5,), Limits()), ("run", 2), ("run", 3), ("run", 4)])
    sandbox._serve(parent)
    assert parent.answers == [("ok", 5), ("ok", 7)] and parent.sent == 3 and parent.messages == [("run", 4)]
