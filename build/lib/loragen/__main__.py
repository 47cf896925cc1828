from loragen.cli import main

main()
