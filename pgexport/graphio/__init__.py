"""Graph-file I/O: ONNX graphs whose weights may live in external data, read and written one
tensor (or chunk of a tensor) at a time, so a pass over a 10 GB decoder holds the graph's
structure plus one chunk.

    read.py   load_structure (a graph without its weights), Source (a tensor's bytes by chunk or
              row block), graph_bytes, link_data_files, the tensor walk (all_tensors, nbytes)
    write.py  write_graph (the streaming skeleton: each initializer produced by the pass or copied
              through), Sink (appends tensor data, aligned), write_inline (a one-file .onnx
              assembled tensor by tensor), atomic replacement of the destination

Every quantizer (int8, int4, embed, static streamed), fp16 and the optimization pass use it.
Import from the submodules: their constants are read where they are defined.
"""
