package store

import "sort"

// ByKey indexes kvs by key.
func ByKey(kvs []KV) map[string]KV {
	m := make(map[string]KV, len(kvs))
	for _, kv := range kvs {
		m[kv.Key] = kv
	}
	return m
}

// Diff lists the events that turn old into now (a sorted listing): a put
// for every key that is new or has another version, then a delete for
// every key that is gone. Backends whose watch re-reads a directory use it.
func Diff(old map[string]KV, now []KV) []Event {
	var evs []Event
	seen := make(map[string]bool, len(now))
	for _, kv := range now {
		seen[kv.Key] = true
		if prev, ok := old[kv.Key]; !ok || prev.Version != kv.Version {
			evs = append(evs, Event{Type: EventPut, KV: kv})
		}
	}
	var gone []string
	for k := range old {
		if !seen[k] {
			gone = append(gone, k)
		}
	}
	sort.Strings(gone)
	for _, k := range gone {
		evs = append(evs, Event{Type: EventDelete, KV: KV{Key: k}})
	}
	return evs
}
