<?php

defined('BASEPATH') or exit('No direct script access allowed');

/*
Module Name: Perfex Webhooks
Description: Sends every CRM change (invoices, leads, tickets, ...) to the perfex-webhooks pipeline, which delivers signed webhooks. Events wait in a local spool while the pipeline is down.
Version: 1.0.0
Requires at least: 3.0.*
Requires PHP: 8.1
Author: perfex-webhooks
*/

define('PERFEX_WEBHOOKS_MODULE_NAME', 'perfex_webhooks');

require_once __DIR__ . '/src/autoload.php';

register_activation_hook(PERFEX_WEBHOOKS_MODULE_NAME, 'perfex_webhooks_activate');
register_uninstall_hook(PERFEX_WEBHOOKS_MODULE_NAME, 'perfex_webhooks_uninstall');

/** Creates the spool and state tables and the default options (install.php; safe to run again). */
function perfex_webhooks_activate()
{
    require __DIR__ . '/install.php';
}

/** Uninstall (not deactivate) drops the tables, spooled events included, and the options. */
function perfex_webhooks_uninstall()
{
    $CI = &get_instance();
    $CI->db->query('DROP TABLE IF EXISTS `' . db_prefix() . 'perfex_webhooks_spool`');
    $CI->db->query('DROP TABLE IF EXISTS `' . db_prefix() . 'perfex_webhooks_state`');
    foreach (array_keys(\PerfexWebhooks\Module::OPTIONS) as $name) {
        delete_option($name);
    }
}

\PerfexWebhooks\Module::boot(__DIR__ . '/hook_map.php');

hooks()->add_action('admin_init', 'perfex_webhooks_admin_init');

/** Setup → Webhooks pipeline (admins only). */
function perfex_webhooks_admin_init()
{
    if (!is_admin()) {
        return;
    }
    $CI = &get_instance();
    $CI->app_menu->add_setup_menu_item('perfex_webhooks', [
        'name' => 'Webhooks pipeline',
        'href' => admin_url('perfex_webhooks'),
        'position' => 65,
    ]);
}
