from newllm.cli import main

main()
