from nattool.cli.app import main

main()
