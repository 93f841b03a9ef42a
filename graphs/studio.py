"""The graph LangGraph Studio / ``langgraph dev`` serves: compiled without a checkpointer
(the server brings its own). Runs arrive without a context, so nodes fall back to the embedded
ShapeWorld backend, built on the first run, not at import."""

from clvr_agent.graphs.graph import build_graph

graph = build_graph().compile(name="clvr")
