package names

import "strings"

// Store layout, below the store's own prefix and next to the driver's
// (driver/schema.go):
//
//	names/<overlay>/<endpoint id>   record: the names of one endpoint, written by its host
//
// A record is served only while the driver's endpoint record
// (endpoints/<overlay>/<endpoint id>) exists and its host is live: names
// go with their endpoints.
const Dir = "names"

func recordKey(overlay, endpointID string) string {
	return Dir + "/" + overlay + "/" + endpointID
}

// splitKey splits names/<overlay>/<endpoint id>.
func splitKey(key string) (overlay, endpointID string, ok bool) {
	rest, ok := strings.CutPrefix(key, Dir+"/")
	if !ok {
		return "", "", false
	}
	overlay, endpointID, ok = strings.Cut(rest, "/")
	return overlay, endpointID, ok && overlay != "" && endpointID != "" && !strings.Contains(endpointID, "/")
}
