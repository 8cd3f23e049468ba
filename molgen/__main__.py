from molgen.cli import run

run()
