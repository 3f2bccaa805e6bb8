"""The seed's command: ``python run_gemma_refactored.py [flags]`` is ``gemmalens run [flags]``."""

from gemmalens.cli.main import seed_main

if __name__ == "__main__":
    seed_main()
