"""The circuit: the engine's scores, the selection of a circuit's nodes, and the networkx graph built from them."""
