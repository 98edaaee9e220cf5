from dtrain.launch.cli import main

main()
