"""Client-side work: a client's data (memory-mapped features or images), head math and local training (`ops`), the
image model whose body the FedAvg family trains (`image_model`), and what a client step receives (`call`)."""
