"""Query: rewrite, time filters, hybrid recall and fusion, spans, clarifying questions, reasoning."""
