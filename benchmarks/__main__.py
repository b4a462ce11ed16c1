from .manager_cost import main

main()
