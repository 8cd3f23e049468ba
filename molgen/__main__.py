from molgen.cli import main

if __name__ == "__main__":  # not when a worker process (molgen.workers) starts from this module
    main()
