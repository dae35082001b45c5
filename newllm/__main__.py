from newllm.core.cli import main

main()
