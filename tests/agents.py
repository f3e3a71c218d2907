"""Python agents for tests (``{"kind": "python", "callable": "tests.agents:..."}``).

``scripted`` reads what to do from the user's message, so one workspace can play every case:
``tokens N [DELAY]`` yields N tokens (``t0 ``, ``t1 `` ...) DELAY seconds apart;
``fail AFTER`` yields AFTER tokens then raises; ``hang`` yields one token then waits for
a long time. Anything else is echoed back in one token.
"""
import time

#: PYTHON_AGENTS for test servers that use the callables here (nothing is allowed by default).
ALLOWED = "tests.agents:reply,tests.agents:scripted,tests.agents:history"


def reply(context):
    """The smallest agent: two tokens."""
    yield "Hello, "
    yield context.message["user_id"] or "there"


def scripted(context):
    words = context.message["content"].split()
    command = words[0] if words else ""
    if command == "tokens":
        count = int(words[1])
        delay = float(words[2]) if len(words) > 2 else 0.0
        for index in range(count):
            if delay:
                time.sleep(delay)  # monkey-patched: a green sleep in the server
            yield f"t{index} "
    elif command == "fail":
        for index in range(int(words[1])):
            yield f"t{index} "
        raise RuntimeError("scripted failure with a secret: hunter2")
    elif command == "hang":
        yield "t0 "
        time.sleep(3600)
        yield "never"
    else:
        yield context.message["content"]


def history(context):
    """Replies with how many history messages it was given and the new message's text."""
    yield f"{len(context.history)}|{context.message['content']}"


not_callable = 42


# --- agents that raise what a well-behaved agent never should (tests/test_agent_security.py)

class AgentAbort(BaseException):
    """Not an Exception: like the exceptions greenlet libraries use to end a task."""


def exits(context):
    """Yields a token, then calls sys.exit (SystemExit ended an eventlet worker)."""
    yield "t0 "
    raise SystemExit(3)


def interrupts(context):
    yield "t0 "
    raise KeyboardInterrupt


def generator_exit(context):
    yield "t0 "
    raise GeneratorExit


def aborts(context):
    yield "t0 "
    raise AgentAbort("a BaseException subclass")


#: How long ``hog`` holds the server's event loop.
HOG_SECONDS = 2.0


def hog(context):
    """Yields a token, then holds the event loop for HOG_SECONDS without ever yielding to it
    (a CPU-bound agent): the server is overloaded for that long. Then one more token."""
    yield "holding "
    time.sleep(0.3)  # a green sleep in the server: the first token goes out meanwhile
    started = time.perf_counter()
    while time.perf_counter() - started < HOG_SECONDS:
        pass
    yield "done"
