from dpokit.cli import main

main()
