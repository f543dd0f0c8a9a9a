from tokenwell.cli import main

main()
