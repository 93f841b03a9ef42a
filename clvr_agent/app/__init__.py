"""The application room: what users and servers call (the runnable and tool, run folders, traces,
the MCP server, the LangGraph server's graph). It wires the core, the graph and the tools together."""
