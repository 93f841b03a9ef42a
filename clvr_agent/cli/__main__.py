from clvr_agent.cli.main import main

main()
