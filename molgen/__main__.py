from molgen.cli import main

main()
