"""The graph LangGraph Studio / ``langgraph dev`` serves: compiled without a checkpointer (the
server brings its own), with the shipped backends wired in. The server builds each run's
:class:`~clvr_agent.state.ClvrContext` from the assistant's and the run's context dicts, so ``{}``
runs the embedded ShapeWorld defaults and an assistant may carry its own backend, options and
settings (e.g. ``{"max_iterations": 1}``)."""

from clvr_agent.graphs.graph import build_graph
from clvr_agent.tools import registry

graph = build_graph(backends=registry).compile(name="clvr")
